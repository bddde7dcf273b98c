"""Hyper-V VHDX images: codec, reader and writer."""
