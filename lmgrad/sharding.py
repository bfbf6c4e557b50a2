"""Where parameters live on a (data, fsdp) device mesh, and loading them straight into their shards.

A mesh spec is a string ``"data:2,fsdp:4"`` (either axis may be left out: the missing one takes the
remaining devices; ``""`` is every device on `data`, as a run without fsdp). The mesh spans this
process's local devices: in a multi-host run each host holds its own copy of the model sharded over
its devices, and hosts split the pairs (`lmgrad.jobs.sketch`).

The rules table (`RULES`, first match wins, over a parameter's HF name and shape):

* fewer than `MIN_SHARD_SIZE` elements (biases, norms, a tiny model's matrices): replicated, since an
  all-gather of a few KiB costs more than it saves;
* otherwise the largest dimension divisible by the `fsdp` size is split over `fsdp` (ties: the
  first such dimension); no divisible dimension: replicated.

`load_sharded` reads a safetensors checkpoint so that each device receives only its slice
(`safe_open(...).get_slice` per shard): the host never holds a whole tensor it does not need.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
AXES = (DATA, FSDP)
MIN_SHARD_SIZE = 1024
"""Tensors with fewer elements (4 KiB in float32) stay replicated (see the module docstring)."""

Rule = Callable[[str, tuple[int, ...], int], "P | None"]


def _replicate_small(name: str, shape: tuple[int, ...], fsdp: int) -> P | None:
    return P() if fsdp == 1 or int(np.prod(shape)) < MIN_SHARD_SIZE else None


def _largest_divisible(name: str, shape: tuple[int, ...], fsdp: int) -> P | None:
    # Stable sort on -size: the first of equal dimensions wins, so the choice is deterministic.
    for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[d] % fsdp == 0:
            return P(*[FSDP if i == d else None for i in range(len(shape))])
    return P()


RULES: tuple[Rule, ...] = (_replicate_small, _largest_divisible)


def parse_mesh(spec: str | None, num_devices: int | None = None) -> dict[str, int]:
    """``"data:2,fsdp:2"`` → {"data": 2, "fsdp": 2} for `num_devices` devices (default: all local).

    Raises:
      ValueError: an unknown axis, a malformed entry, or sizes that do not multiply to the count.
    """
    n = len(jax.local_devices()) if num_devices is None else int(num_devices)
    sizes: dict[str, int] = {}
    for part in filter(None, (s.strip() for s in (spec or "").split(","))):
        m = re.fullmatch(r"(\w+)\s*[:=]\s*(\d+)", part)
        if not m or m.group(1) not in AXES or int(m.group(2)) < 1:
            raise ValueError(f"mesh spec {spec!r}: entry {part!r} is not AXIS:SIZE with AXIS in {AXES}, SIZE >= 1")
        if m.group(1) in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {m.group(1)!r} given twice")
        sizes[m.group(1)] = int(m.group(2))
    fsdp = sizes.get(FSDP, 1)
    if DATA not in sizes:
        if n % fsdp:
            raise ValueError(f"mesh spec {spec!r}: fsdp={fsdp} does not divide the {n} devices")
        sizes[DATA] = n // fsdp
    if sizes[DATA] * fsdp > len(jax.local_devices()):
        raise ValueError(f"mesh spec {spec!r}: {sizes[DATA]}×{fsdp} devices asked for, "
                         f"{len(jax.local_devices())} local devices exist")
    if num_devices is not None and sizes[DATA] * fsdp != n:
        raise ValueError(f"mesh spec {spec!r}: data×fsdp = {sizes[DATA] * fsdp}, but num_devices={n}")
    return {DATA: sizes[DATA], FSDP: fsdp}


def data_size(mesh: Mesh | None) -> int:
    """Devices along `mesh`'s data axis (1 without a mesh)."""
    return 1 if mesh is None else int(dict(mesh.shape).get(DATA, 1))


def rows_for(rows: int, mesh: Mesh | None) -> int:
    """`rows` rounded up to a multiple of the data axis, so a batch splits evenly over it."""
    d = data_size(mesh)
    return -(-rows // d) * d


def mesh_from_spec(spec: str | None, num_devices: int | None = None) -> Mesh:
    """The (data, fsdp) `Mesh` of a spec string over the first local devices (see `parse_mesh`)."""
    sizes = parse_mesh(spec, num_devices)
    devices = jax.local_devices()[: sizes[DATA] * sizes[FSDP]]
    return Mesh(np.asarray(devices).reshape(sizes[DATA], sizes[FSDP]), AXES)


def param_spec(name: str, shape: Sequence[int], fsdp: int, rules: Sequence[Rule] = RULES) -> P:
    """The `PartitionSpec` the rules table gives parameter `name` of `shape` for an fsdp size."""
    shape = tuple(int(s) for s in shape)
    for rule in rules:
        spec = rule(name, shape, int(fsdp))
        if spec is not None:
            return spec
    return P()


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[Rule] = RULES) -> Any:
    """A `NamedSharding` per leaf of `params` (nested Flax or flat HF-named; arrays or
    ShapeDtypeStructs), from the rules table. Leaves are named by their HF name."""
    from lmgrad.params import flatten, unflatten

    k = mesh.shape[FSDP]
    nested = any(isinstance(v, Mapping) for v in params.values())
    flat = flatten(params) if nested else dict(params)
    out = {n: NamedSharding(mesh, param_spec(n, v.shape, k, rules)) for n, v in flat.items()}
    return unflatten(out) if nested else out


def shard_bytes(params: Any, shardings: Any) -> int:
    """Bytes of `params` held by ONE device under `shardings` (the largest device's share)."""
    total = 0
    for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        shape = s.shard_shape(tuple(x.shape))
        total += int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
    return total


def place(params: Any, mesh: Mesh, rules: Sequence[Rule] = RULES) -> Any:
    """`params` (already in memory) moved to `mesh` by the rules table."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


# ------------------------------------------------------------------------ sharded loading
def _safetensors_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name → shard file, from the index (sharded checkpoints) or the single file."""
    from lmgrad.models.loading import safetensors_files

    named, files = safetensors_files(directory)
    if named is not None:
        return named
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="numpy") as st:
        return {k: files[0] for k in st.keys()}


def load_sharded(spec: str, mesh: Mesh, *, dtype: str | Any = "float32", tokenizer: bool = True,
                 rules: Sequence[Rule] = RULES) -> Any:
    """Like `lmgrad.models.load_model` for a safetensors directory (or hub id), with every parameter
    read slice by slice into its `NamedSharding` on `mesh`: each device receives only its shard.

    Names are HF names on both sides (the converters keep HF names and layouts), and conversion is
    as total as `load_model`'s: a missing, leftover or mis-shaped tensor raises `CheckpointError`
    naming it. Returns a `LoadedModel` whose provenance equals `load_model`'s for the same spec, so
    stores written either way mix and resume.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    from lmgrad.io import sha256_file
    from lmgrad.models.config import from_hf_config
    from lmgrad.models.loading import CheckpointError, LoadedModel, build_module, param_shapes
    from lmgrad.params import head_weight, unflatten

    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    from lmgrad.models.loading import checkpoint_directory  # the loader's one spec resolution

    provenance: dict[str, Any] = {"spec": spec, "dtype": str(dtype)}
    found = checkpoint_directory(spec)
    if found is None:
        raise CheckpointError(f"{spec}: sharded loading needs a safetensors directory or hub id (org/name[@rev])")
    directory, revision = found
    if revision is not None:
        provenance["revision"] = revision
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory}: no config.json")
    hf_config = AutoConfig.from_pretrained(str(directory))
    config = from_hf_config(hf_config)
    files = _safetensors_files(directory)
    expected = param_shapes(config)
    missing = sorted(set(expected) - set(files))
    leftover = sorted(set(files) - set(expected))
    if config.tie_word_embeddings and head_weight(config.family) in leftover:
        leftover.remove(head_weight(config.family))
    buffers = (r".*\.(attn|attention)\.(bias|masked_bias)$", r".*rotary_emb\.inv_freq$")
    leftover = [k for k in leftover if not any(re.fullmatch(b, k) for b in buffers)]
    if missing:
        raise CheckpointError(f"{directory}: missing tensors for {config.model_type}: {', '.join(missing[:20])}")
    if leftover:
        raise CheckpointError(f"{directory}: tensors not used by the {config.model_type} architecture: "
                              f"{', '.join(leftover[:20])}")
    shardings = param_shardings({n: jax.ShapeDtypeStruct(s, dtype) for n, s in expected.items()}, mesh, rules)
    handles: dict[pathlib.Path, Any] = {}
    params = {}
    try:
        for name, shape in expected.items():
            f = files[name]
            if f not in handles:
                if not f.exists():
                    raise CheckpointError(f"{directory}: shard {f.name} (holding {name}) is missing")
                # framework="flax" keeps bfloat16 exact (numpy has no bfloat16).
                handles[f] = safe_open(str(f), framework="flax")
            sl = handles[f].get_slice(name)
            if tuple(sl.get_shape()) != shape:
                raise CheckpointError(f"{f}: tensor {name} has shape {tuple(sl.get_shape())}, expected {shape}")

            def read(index: tuple[slice, ...], sl=sl) -> np.ndarray:
                return np.asarray(jnp.asarray(sl[index], dtype=dtype))

            params[name] = jax.make_array_from_callback(shape, shardings[name], read)
    finally:
        handles.clear()
    used = sorted(set(files[n] for n in expected) | set(files.values()))
    provenance["weights"] = [{"file": f.name, "sha256": sha256_file(f)} for f in used]
    provenance["format"] = "safetensors"
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(directory))
        except Exception:  # same policy as load_model: a missing tokenizer is not fatal here
            tok = None
    if tok is not None:
        provenance["tokenizer"] = {"class": type(tok).__name__, "name_or_path": getattr(tok, "name_or_path", None),
                                   "vocab_size": len(tok), "bos_token": tok.bos_token, "eos_token": tok.eos_token}
    provenance["model_type"] = config.model_type
    provenance["num_params"] = int(sum(int(np.prod(s)) for s in expected.values()))
    return LoadedModel(spec=spec, config=config, module=build_module(config), params=unflatten(params),
                       tokenizer=tok, hf_config=hf_config, provenance=provenance)
