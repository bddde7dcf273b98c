"""raw images: the file is the disk."""
