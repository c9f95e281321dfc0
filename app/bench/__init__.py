"""Benchmark helpers (not imported by the stack)."""
