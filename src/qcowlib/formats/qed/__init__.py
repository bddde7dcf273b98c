"""QED images (QEMU Enhanced Disk): codec, reader and check (read-only)."""
