"""Kernel micro-benchmarks: one op family each, against its PyTorch reference on the same inputs."""
