"""Sharded-parameter compute on (data, fsdp) meshes of fake CPU devices equals the single-device run.

Both differential paths (exact: vmap(grad) + projector; factored: one batched backward) run on
parameters split over `fsdp` by `lmgrad.sharding`'s rules table and loaded straight into their shards
from safetensors. Meshes 2×2 and 1×4 run in this process (conftest's 4 devices); 4×2 needs 8 devices,
set before jax is imported, so it runs in one subprocess that writes its sketches for this process
to compare. Each device is shown to hold only its shard of the parameters the compiled function
takes (addressable shard shapes, and the compiled per-device argument size).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers_tokenizer import save_tiny_llama
from lmgrad import sharding
from lmgrad.grads import sharded_factored_fn, sharded_sketch_fn
from lmgrad.grads.factored import FactoredSpec, make_factored_sketch_fn
from lmgrad.jobs.inputs import InputOptions
from lmgrad.models import load_model, logits_fn
from lmgrad.params import flatten
from lmgrad.sketch import make_projector
from lmgrad.tasks.batching import iter_pair_batches

ROOT = pathlib.Path(__file__).resolve().parent.parent
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsdp_llama")
    save_tiny_llama(path, num_hidden_layers=1)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(str(ckpt), tokenizer=False)


def _batch(vocab, n=5, seed=0):
    rng = np.random.default_rng(seed)
    good = [np.concatenate([[1], rng.integers(3, vocab, rng.integers(3, 7))]).astype(np.int32) for _ in range(n)]
    bad = [np.where(np.arange(len(g)) == 2, (g - 2) % (vocab - 3) + 3, g).astype(np.int32) for g in good]
    (gb, bb), = iter_pair_batches(good, bad, batch_size=n + 1, min_len=8)  # one padding row
    return gb, bb


def _fns(model, mesh):
    # The exact path differentiates a subset that has tensors split along either dimension and a
    # replicated one (fewer leaves: a shorter compile); the factored path sketches every module.
    flat = flatten(model.params)
    names = [n for n in sorted(flat) if any(p in n for p in ("embed_tokens", "mlp.", "k_proj", "lm_head"))]
    shapes = {n: tuple(flat[n].shape) for n in names}
    proj = make_projector("sjlt", 32, seed=1)
    exact = sharded_sketch_fn(logits_fn(model), names, lambda g: proj.project(g, shapes), mesh)
    factored = sharded_factored_fn(make_factored_sketch_fn(model, FactoredSpec(seed=1, r_in=4, r_out=4)), mesh)
    return {"exact": exact, "factored": factored}


def _sketches(model, mesh_spec, batch):
    """{method: [B, K]} on the mesh `mesh_spec`, with the model loaded into its shards there."""
    mesh = sharding.mesh_from_spec(mesh_spec)
    fns = _fns(model, mesh)
    return {m: np.asarray(f(model.params, *batch)) for m, f in fns.items()}, fns


# The subprocess: 8 fake devices, meshes 4×2 and 1×4, the model loaded with sharding.load_sharded.
_CHILD = r"""
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, sys.argv[3])
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
import test_fsdp as t
from lmgrad import sharding
assert jax.device_count() == 8
out = {}
for spec in ("data:4,fsdp:2", "data:1,fsdp:4"):
    model = sharding.load_sharded(sys.argv[1], sharding.mesh_from_spec(spec), tokenizer=False)
    got, _ = t._sketches(model, spec, t._batch(model.config.vocab_size))
    out.update({f"{spec}/{m}": v for m, v in got.items()})
np.savez(sys.argv[2], **out)
"""


@pytest.fixture(scope="module")
def single(model):
    batch = _batch(model.config.vocab_size)
    out, _ = _sketches(model, "data:1", batch)
    return out


def test_mesh_spec_parsing():
    assert sharding.parse_mesh("") == {"data": 4, "fsdp": 1}
    assert sharding.parse_mesh("fsdp:2") == {"data": 2, "fsdp": 2}
    assert sharding.parse_mesh("data:1,fsdp:4") == {"data": 1, "fsdp": 4}
    assert sharding.parse_mesh("data:1", num_devices=1) == {"data": 1, "fsdp": 1}
    for bad, why in (("data:3,fsdp:2", "3×2 devices"), ("model:2", "AXIS:SIZE"), ("fsdp:3", "does not divide"),
                     ("data:2,data:2", "twice")):
        with pytest.raises(ValueError, match=why):
            sharding.parse_mesh(bad)


def test_rules_table():
    spec = lambda shape: sharding.param_spec("w", shape, 4)  # noqa: E731
    assert spec((48, 32)) == P("fsdp", None)  # largest dim divisible by 4
    assert spec((50, 32)) == P(None, "fsdp")  # 50 is not: the next largest
    assert spec((32,)) == P()  # below MIN_SHARD_SIZE: replicated
    assert spec((1027, 3)) == P()  # large, but no dimension divisible by 4
    assert sharding.param_spec("w", (48, 32), 1) == P()


@pytest.fixture(scope="module")
def child_8(ckpt, tmp_path_factory):
    """Meshes 4×2 and 1×4 on 8 fake devices, started at once so that it compiles beside this process."""
    out = tmp_path_factory.mktemp("fsdp8") / "s.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(ckpt), str(out), str(ROOT / "tests")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    yield proc, out
    if proc.poll() is None:
        proc.kill()


def _close(got, want, what):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6 * np.abs(want).max(), err_msg=what)


def test_fsdp_2x2_sketches_and_shards(ckpt, child_8, single):
    mesh_spec = "data:2,fsdp:2"
    mesh = sharding.mesh_from_spec(mesh_spec)
    model = sharding.load_sharded(str(ckpt), mesh, tokenizer=False)
    batch = _batch(model.config.vocab_size)
    out, fns = _sketches(model, mesh_spec, batch)
    for method, s in out.items():
        _close(s, single[method], f"{method} on {mesh_spec}")
        assert np.all(s[-1] == 0) and np.abs(s[:-1]).max(axis=1).min() > 0  # padding row stays zero
    # What each device holds while the differential runs: the compiled function's own inputs.
    k = dict(mesh.shape)["fsdp"]
    full = sum(int(np.prod(v.shape)) * 4 for v in flatten(model.params).values())
    for method, fn in fns.items():
        placed = fn.placed(model.params)
        params = placed[0] if method == "factored" else placed
        others = jax.tree.leaves(placed[1]) if method == "factored" else []  # replicated projection factors
        n_split = 0
        for x in jax.tree.leaves(params):
            shapes = {tuple(s.data.shape) for s in x.addressable_shards}
            assert shapes == {x.sharding.shard_shape(x.shape)}
            if int(np.prod(x.shape)) >= sharding.MIN_SHARD_SIZE:
                n_split += 1
                assert int(np.prod(next(iter(shapes)))) * k == int(np.prod(x.shape))
        assert n_split >= 4
        held = sharding.shard_bytes(params, jax.tree.map(lambda x: x.sharding, params))
        assert held < full * (1 / k + 0.1), (held, full)
        # The compiled program's per-device arguments: the shards, the factors and the device's rows.
        mem = fn.lower(model.params, *batch).compile().memory_analysis()
        rows = sum(np.asarray(v).nbytes for v in (batch[0].input_ids, batch[0].attention_mask,
                                                    batch[0].target_mask, batch[0].valid)) * 2
        assert held <= mem.argument_size_in_bytes <= held + sum(x.nbytes for x in others) + rows, method
    proc, path = child_8
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    got = np.load(path)
    for mesh_spec in ("data:4,fsdp:2", "data:1,fsdp:4"):
        for method in ("exact", "factored"):
            _close(got[f"{mesh_spec}/{method}"], single[method], f"{method} on {mesh_spec} (8 devices)")


def test_job_loads_sharded_when_fsdp(ckpt):
    inputs = InputOptions(model=str(ckpt), mesh="data:2,fsdp:2")
    mesh = inputs.make_mesh()
    sharded = inputs.load_model(mesh)
    whole = load_model(str(ckpt))
    assert sharded.provenance == whole.provenance  # stores written either way mix and resume
    for name, x in flatten(sharded.params).items():
        assert x.sharding.spec == sharding.param_spec(name, x.shape, 2), name
        np.testing.assert_array_equal(np.asarray(x), np.asarray(flatten(whole.params)[name]), err_msg=name)
