"""Benchmarks of higher against hand-written torch.func code (``python -m benchmarks``)."""
