"""The bench's PyTorch peers compute the same sketch as lmgrad's factored path.

`bench/peers.py` holds the two peers the benchmark compares lmgrad with (hook-based Kronecker
projection as LoGra/bergson; `torch.func` vmap(grad) + projection). Fed lmgrad's own projection
matrices, both must return lmgrad's [B, K] sketch on the same weights and pairs (weight matrices
only: ``handle_vectors="exclude"``), so the bench compares one computation. The oracle is independent
of lmgrad's model code: the transformers PyTorch model and torch autograd.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.peers import TorchHookSketch, TorchVmapSketch, make_peer  # noqa: E402

from lmgrad.grads.factored import FactoredSpec, make_factored_sketch_fn  # noqa: E402
from lmgrad.models import build_module, convert_state_dict, from_hf_config  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB = 53
ARCHS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False, rms_norm_eps=1e-5),
}
SPEC = FactoredSpec(seed=3, r_in=4, r_out=5, overrides=(("embed", 3, 6),), handle_vectors="exclude")


@pytest.fixture(scope="module", params=sorted(ARCHS))
def setup(request):
    torch.manual_seed(0)
    hf = ARCHS[request.param]()
    tmodel = transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="eager").float().eval()
    config = from_hf_config(hf)
    params = convert_state_dict({k: v.numpy() for k, v in tmodel.state_dict().items()}, config, source="torch")
    fn = make_factored_sketch_fn(build_module(config), SPEC, params=params)
    rng = np.random.default_rng(1)
    b, t = 3, 7

    def make(lengths):
        ids = rng.integers(1, VOCAB, (b, t)).astype(np.int32)
        am = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
        tm = am.astype(np.float32)
        tm[:, 0] = 0
        return {"input_ids": ids * am, "attention_mask": am, "target_mask": tm, "valid": np.ones(b, bool)}

    good, bad = make([7, 5, 7]), make([6, 7, 4])  # right padding in both halves
    ours = np.asarray(fn(params, good, bad)[0], np.float64)
    return tmodel, fn, good, bad, ours


def _close(peer: np.ndarray, ours: np.ndarray) -> None:
    assert peer.shape == ours.shape
    err = np.abs(peer - ours).max() / np.abs(ours).max()
    assert err < 2e-4, f"peer differs from lmgrad by {err:.2e} of the largest entry"


def test_hook_peer_equals_lmgrad(setup):
    tmodel, fn, good, bad, ours = setup
    _close(TorchHookSketch(tmodel, fn.factors(), fn.layout)(good, bad), ours)


def test_vmap_peer_equals_lmgrad(setup):
    tmodel, fn, good, bad, ours = setup
    _close(TorchVmapSketch(tmodel, fn.factors(), fn.layout, chunk=2)(good, bad), ours)


def test_peers_refuse_vector_blocks(setup):
    tmodel, fn, *_ = setup
    with pytest.raises(ValueError, match="weight matrices only"):
        make_peer("hooks", tmodel, fn.factors(), [{**fn.layout[0], "role": "bias"}])
    with pytest.raises(ValueError, match="unknown torch peer"):
        make_peer("jvp", tmodel, fn.factors(), fn.layout)

