"""Storage: the persistent index over the core's vectors."""
