"""qcow2 on-disk structures (QEMU ``docs/interop/qcow2.txt``)."""
