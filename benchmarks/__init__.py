"""Benchmarks of muon_optax; run `python benchmarks/run.py` (not a test)."""
