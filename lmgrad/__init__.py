"""lmgrad: high-throughput gradient analysis of language models on minimal pairs."""

__version__ = "0.1.0"
