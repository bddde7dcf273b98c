"""Pure on-disk format codecs: bytes in, values out; no file access."""
