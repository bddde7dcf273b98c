"""VirtualBox VDI images: codec, reader and writer."""
