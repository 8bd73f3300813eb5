"""Test-only helpers importable by subprocesses (PYTHONPATH=tests)."""
