"""`builder demo` (to be written)."""
