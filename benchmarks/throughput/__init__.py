"""The pieces of `benchmarks/train_throughput.py` (its docstring says what each measures)."""
