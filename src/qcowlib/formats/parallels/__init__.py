"""Parallels expandable images: codec, reader and check (read-only)."""
