"""Latency, throughput and fidelity benchmarks, side by side with the PyTorch reference."""
