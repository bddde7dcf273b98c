"""ISO 9660 images: only recognised (and then read as raw disks)."""
