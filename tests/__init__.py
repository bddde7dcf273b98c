"""qcowlib tests."""
