"""Benchmark scripts (``python -m benchmarks.<name>``): they print numbers; they are not tests."""
