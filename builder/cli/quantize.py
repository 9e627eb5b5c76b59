"""`builder quantize` (to be written)."""
