"""Examples: DPR in plain training loops on models blockdpr did not design (run by tests/test_examples.py)."""
