"""Benchmarks: each module runs one measurement and prints (and returns) its figures."""
