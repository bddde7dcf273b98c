"""User-level operations composed from disk and engine."""
