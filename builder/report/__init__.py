"""Run records (bench and verify), their SQLite history, reports and comparisons.

Nothing here imports torch: reports and gates run on any CI machine.
"""
