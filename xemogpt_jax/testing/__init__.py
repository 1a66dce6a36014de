"""Helpers shared by the tests and the benchmarks (reference compositions, a byte-level tokenizer).

Nothing in the library imports this package; its ``torch_reference`` module needs torch.
"""
