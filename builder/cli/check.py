"""`builder check` (to be written)."""
