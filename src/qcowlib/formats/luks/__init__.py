"""LUKS1 encrypted volumes (cryptsetup's on-disk format 1.2.3), as QEMU's ``luks`` driver
reads them, and the LUKS header that encrypted qcow2 images embed."""
