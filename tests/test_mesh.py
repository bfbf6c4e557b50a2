"""Sharded differentials on 4 fake CPU devices (conftest's XLA_FLAGS) equal the 1-device ones.

Batch sizes are chosen not to divide the device count, and a deliberately unguarded version
shows the trap the mesh code exists for: vmap(grad) inside shard_map with replicated
parameters returns per-example gradients summed across devices.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

from lmgrad import grads as lg
from lmgrad.grads.differential import per_example_core
from lmgrad.grads.mesh import ShardedRowsFn
from lmgrad.models import load_model, logits_fn
from lmgrad.params import flatten as flatten_params, layers, select as select_params, split as split_params
from lmgrad.sketch import make_projector
from lmgrad.tasks.batching import iter_pair_batches

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB = 97


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2_mesh")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    transformers.AutoModelForCausalLM.from_config(config).float().save_pretrained(path, safe_serialization=True)
    return load_model(str(path), tokenizer=False)


@pytest.fixture(scope="module")
def apply(gpt2):
    # One function object, so the reference's compiled one-pair gradient is reused across tests.
    return logits_fn(gpt2)


@pytest.fixture(scope="module")
def names(gpt2):
    # Block 1 only: a shorter backward keeps the compiles of these tests quick.
    return select_params(flatten_params(gpt2.params), layers(1, 1))


@pytest.fixture(scope="module")
def fn4(apply, names):
    return lg.sharded_per_example_fn(apply, names, lg.make_mesh(4), chunk_size=2)


def _batch(n, seed, batch_size=None):
    rng = np.random.default_rng(seed)
    good = [np.concatenate([[1], rng.integers(1, VOCAB, rng.integers(2, 7))]).astype(np.int32) for _ in range(n)]
    bad = [np.where(np.arange(len(g)) == 2, g % (VOCAB - 1) + 1, g).astype(np.int32) for g in good]
    (gb, bb), = iter_pair_batches(good, bad, batch_size=batch_size or n, min_len=8)
    return gb, bb


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(np.asarray(b))) + 1e-30))


def test_make_mesh_and_param_shardings(gpt2):
    assert jax.device_count() == 4, "conftest should give 4 fake CPU devices"
    assert dict(lg.make_mesh().shape) == {"data": 4, "fsdp": 1}
    assert dict(lg.make_mesh(1).shape) == {"data": 1, "fsdp": 1}
    mesh = lg.make_mesh(4, fsdp=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
    with pytest.raises(ValueError, match="5 devices"):
        lg.make_mesh(5)
    with pytest.raises(ValueError, match="fsdp=3"):
        lg.make_mesh(4, fsdp=3)
    flat = flatten_params(gpt2.params)
    shard = lg.param_shardings(flat, mesh)
    assert shard["transformer.h.0.mlp.c_fc.weight"].spec == P(None, "fsdp")  # [32, 128]: largest dim
    assert shard["transformer.wte.weight"].spec == P(None, "fsdp")  # [97, 32]: 97 is odd
    placed = jax.device_put(flat, shard)
    np.testing.assert_array_equal(placed["transformer.wte.weight"], flat["transformer.wte.weight"])


def test_per_example_1_vs_4_devices(gpt2, apply, names, fn4):
    fn1 = lg.sharded_per_example_fn(apply, names, lg.make_mesh(1), chunk_size=2)
    params = lg.replicate(gpt2.params, lg.make_mesh(4))
    for seed in (1, 2):  # 7 rows → padded to 8 on 4 devices × chunk 2; same shapes both times
        gb, bb = _batch(7, seed)
        o1, o4 = fn1(gpt2.params, gb, bb), fn4(params, gb, bb)
        ref = lg.per_example_reference(apply, gpt2.params, names, gb, bb)
        for n in names:
            assert o4[n].shape == (7,) + ref[n].shape[1:]
            np.testing.assert_allclose(o4[n], o1[n], rtol=1e-6, atol=1e-9, err_msg=n)
            assert _rel(o4[n], ref[n]) < 1e-5, n
    assert fn1.traces == 1 and fn4.traces == 1


def test_sketch_1_vs_4_devices(gpt2, apply, names):
    proj = make_projector("rademacher", 8, seed=3, block_size=100)  # blocked loop inside shard_map
    fn1 = lg.sharded_sketch_fn(apply, names, proj.project, lg.make_mesh(1), chunk_size=2)
    fn4 = lg.sharded_sketch_fn(apply, names, proj.project, lg.make_mesh(4), chunk_size=2)
    gb, bb = _batch(5, seed=4, batch_size=6)  # one padding row in the batch, then 6 → 8 rows
    s1, s4 = np.asarray(fn1(gpt2.params, gb, bb)), np.asarray(fn4(gpt2.params, gb, bb))
    assert s4.shape == (6, 8) and s4.dtype == np.float32
    np.testing.assert_allclose(s4, s1, rtol=1e-6, atol=1e-8)
    assert np.all(s4[5] == 0)
    ref = lg.per_example_reference(apply, gpt2.params, names, gb, bb)
    np.testing.assert_allclose(s4, np.asarray(proj.project(ref)), rtol=1e-5, atol=1e-6)


def test_trap_replicated_params_sum_across_devices(gpt2, apply, names, fn4):
    """Without the pcast to device-varying, each local row's gradient becomes the sum over the
    4 devices of that row position; the guarded version (used by the public API) does not."""
    mesh = lg.make_mesh(4)
    gb, bb = _batch(7, seed=1)  # padded to 8: 2 rows per device
    ref = lg.per_example_reference(apply, gpt2.params, names, gb, bb)
    core = per_example_core(apply, 2)
    unguarded = ShardedRowsFn(lambda rep, g, b: core(rep[0], rep[1], g, b), mesh, multiple=2)
    trap = unguarded(split_params(gpt2.params, names), gb, bb)
    good = fn4(gpt2.params, gb, bb)
    for n in names[:3]:
        r8 = np.concatenate([ref[n], np.zeros_like(ref[n][:1])])
        summed = np.tile(r8.reshape(4, 2, *r8.shape[1:]).sum(0), (4,) + (1,) * (r8.ndim - 1))[:7]
        assert _rel(trap[n], summed) < 1e-5, n
        assert _rel(trap[n], ref[n]) > 0.1, n
        assert _rel(good[n], ref[n]) < 1e-5, n
