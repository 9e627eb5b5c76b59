"""`builder build` (to be written)."""
