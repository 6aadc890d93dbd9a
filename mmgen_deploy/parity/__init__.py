"""Parity (backend vs PyTorch FP32) and benchmarks."""
