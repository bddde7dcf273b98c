"""The vectorised core: zero detection, data movement and output handling."""
