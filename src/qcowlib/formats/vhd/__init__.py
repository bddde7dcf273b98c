"""VHD (qemu-img's ``vpc``) images: codec, reader and writer."""
