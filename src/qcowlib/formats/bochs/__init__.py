"""Bochs growing redolog images: codec and reader (read-only)."""
