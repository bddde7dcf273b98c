"""Legacy QCOW (version 1) images: codec and reader (read-only)."""
