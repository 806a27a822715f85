"""The GPU verification run (`benchmarks/gpu/verify.py`) and its wheel helper (`wheels.py`)."""
