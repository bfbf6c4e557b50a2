"""Shared pytest setup: float32 everywhere, fixed seeds, a 4-device fake CPU mesh where asked for."""
import os

# Four fake CPU devices so mesh tests run on any machine; harmless for single-device tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
