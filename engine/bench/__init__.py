"""Benchmarks that ship with the product: `tierkv bench throughput|latency|offload`."""
