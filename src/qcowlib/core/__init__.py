"""Format-neutral machinery: host files, the Disk protocol, chains, copying, sinks."""
