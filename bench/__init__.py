"""Benchmarks of the project on the machine it runs on (`make bench`).

Every figure is measured in one run and compared with the machine's own float32 matmul rate,
so ratios, not absolute seconds, are what carries from run to run on a shared machine.
"""
