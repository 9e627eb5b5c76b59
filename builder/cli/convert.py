"""`builder convert` (to be written)."""
