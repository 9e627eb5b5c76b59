"""Checkpoint I/O: streaming reads, progressive writes, manifests, atomic output directories."""
