"""Apple DMG (UDIF) images: trailer, resources, chunk table and reader (read-only)."""
