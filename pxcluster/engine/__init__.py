"""The volume engine: runs where a volume is attached, fans I/O out to its replicas."""
