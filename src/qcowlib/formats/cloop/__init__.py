"""cloop V2.0 compressed loop images: codec and reader (read-only)."""
