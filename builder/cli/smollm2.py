"""`builder smollm2` (to be written)."""
