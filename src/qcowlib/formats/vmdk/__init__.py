"""VMware VMDK images: codec, reader and writer."""
