"""`builder plan` (to be written)."""
