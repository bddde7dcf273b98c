"""Benchmarks against qemu-img (not part of the test run)."""
