"""Tests for qcowlib.formats."""
