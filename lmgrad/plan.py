"""Dry-run memory plans: what one device will hold for a model, mesh, sequence length and method,
and the largest batch that fits, without reading (or allocating) any weight.

The model comes from its `config.json` alone (a checkpoint directory, a config file, a hub id whose
config is fetched), a GGUF file's header (a packaged name such as `smollm2` is fetched and cached as
a run would) or from a shape name in `SHAPES` (public config values of GPT-2, Pythia-12B and
Llama-3-8B). Parameters are `jax.ShapeDtypeStruct`s from `jax.eval_shape`, placed by the mesh's
`NamedSharding`s, and the stage's own compiled function is lowered and compiled for them
(`jit(...).lower(...).compile().memory_analysis()`): XLA's per-device buffer assignment, no
allocation. Rows of the plan, per device:

* parameters: this device's shards (`lmgrad.sharding.shard_bytes`), exact;
* activations: the compiled temp buffers (activations, per-example gradients of a chunk, backward
  intermediates; XLA's own count);
* sketch: the output rows plus the projection state (factored path: the P_in/P_out factors);
* optimizer: the probe stage's moments (Adam: two float32 copies of what is tuned), per tuned copy;
* inputs: the token batch.

Depth: by default the real depth is compiled. `depth="probe"` compiles only 1- and 2-block variants
and extrapolates the per-block cost linearly (much faster for a 36-block model; parameters stay
exact, but XLA's buffer reuse need not be linear in depth, so treat a probe as a first look and
confirm a tight fit with the full depth). Batch: two batch sizes
are compiled and memory is linear in the batch between them, which gives the largest batch that fits
`device_memory_gb` (default: the device's own, where the runtime reports it).

Plans are for the devices the process sees: plan an 8-GPU host on that host, or on a CPU with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (CPU buffer assignment, close to but not the
same as the GPU's).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import resource
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lmgrad import sharding

GIB = 1024 ** 3

# Public config.json values (the fields the converters read), for plans without the checkpoint.
SHAPES: dict[str, dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
             "n_head": 12, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
             "bos_token_id": 50256, "eos_token_id": 50256},
    "pythia-12b": {"model_type": "gpt_neox", "vocab_size": 50688, "hidden_size": 5120, "num_hidden_layers": 36,
                   "num_attention_heads": 40, "intermediate_size": 20480, "max_position_embeddings": 2048,
                   "rotary_pct": 0.25, "rotary_emb_base": 10000, "use_parallel_residual": True,
                   "hidden_act": "gelu", "layer_norm_eps": 1e-5, "tie_word_embeddings": False,
                   "bos_token_id": 0, "eos_token_id": 0},
    "llama-3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                   "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
                   "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001},
}
JOBS = ("sketch", "evaluate", "probe")


def hf_config(model: str) -> Any:
    """The `transformers` config of `model` (a `SHAPES` name, a directory or config.json file, a GGUF
    file or packaged GGUF name, or a hub id), reading config.json or the GGUF header only."""
    from transformers import AutoConfig

    if model in SHAPES:
        cfg = dict(SHAPES[model])
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    from lmgrad.models.fetch import PACKAGES

    if model in PACKAGES or model == "default":   # before paths, as `load_model` resolves them
        from lmgrad.models.fetch import gguf_path
        from lmgrad.models.gguf import gguf_config

        # The packaged file is fetched (and cached) as the run itself would; only its header is read.
        return gguf_config(gguf_path("smollm2" if model == "default" else model))
    path = pathlib.Path(model).expanduser()
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json (a dry run reads the config only)")
        return AutoConfig.from_pretrained(str(path))
    if path.suffix == ".gguf":
        from lmgrad.models.gguf import gguf_config

        return gguf_config(path)
    from huggingface_hub import hf_hub_download

    repo, _, rev = model.partition("@")
    return AutoConfig.from_pretrained(str(pathlib.Path(hf_hub_download(repo, "config.json", revision=rev or None)).parent))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of one stage; `max_batch` pairs (sentences for evaluate) fit `device_bytes`."""

    model: str
    job: str
    method: str
    mesh: dict[str, int]
    seq_len: int
    batch_size: int
    num_params: int
    parameters: int
    activations: int
    sketch: int
    optimizer: int
    inputs: int
    per_row: float
    device_bytes: int | None
    max_batch: int | None
    depth: str
    host_peak_rss: int

    @property
    def total(self) -> int:
        return self.parameters + self.activations + self.sketch + self.optimizer + self.inputs

    def fits(self, device_bytes: int) -> int:
        """The largest batch (a multiple of the data-axis size, as batches are padded) whose planned
        total stays within `device_bytes`: total is linear in the batch with slope `per_row`."""
        fixed = self.total - self.per_row * self.batch_size
        if fixed > device_bytes:
            return 0
        n = int((device_bytes - fixed) // self.per_row) if self.per_row > 0 else 1 << 20
        step = self.mesh[sharding.DATA]
        return min((n // step) * step, 1 << 20)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total}

    def table(self) -> str:
        """The plan as the text a --dry_run prints."""
        mesh = ",".join(f"{k}:{v}" for k, v in self.mesh.items())
        g = lambda b: f"{b / GIB:9.3f} GiB" if b >= GIB / 10 else f"{b / 2**20:9.3f} MiB"  # noqa: E731
        lines = [f"dry-run plan: {self.model} ({self.num_params / 1e9:.3g}B parameters), job={self.job}, "
                 f"method={self.method}, mesh={mesh}, seq_len={self.seq_len}, batch={self.batch_size}, "
                 f"depth={self.depth}",
                 "per device:",
                 f"  parameters   {g(self.parameters)}",
                 f"  activations  {g(self.activations)}   (compiled temp buffers)",
                 f"  sketch       {g(self.sketch)}   (output rows + projection factors; evaluate: scores)",
                 f"  optimizer    {g(self.optimizer)}",
                 f"  inputs       {g(self.inputs)}",
                 f"  total        {g(self.total)}   (+{self.per_row / 2**20:.2f} MiB per extra row)"]
        if self.device_bytes:
            fit = ("does not fit even at the smallest batch" if self.max_batch == 0
                   else "largest batch not computed (fit=False)" if self.max_batch is None
                   else f"largest batch that fits: {self.max_batch}")
            lines.append(f"device memory {g(self.device_bytes)}: {fit}")
        lines.append(f"host peak RSS {self.host_peak_rss / GIB:.2f} GiB (no weights read)")
        return "\n".join(lines)


def device_memory(device: Any = None) -> int | None:
    """The device's own memory in bytes (`memory_stats()['bytes_limit']`), None where unreported (CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends raise instead of returning None
        stats = {}
    return int(stats["bytes_limit"]) if "bytes_limit" in stats else None


def _abstract_params(config: Any, dtype: Any) -> dict[str, Any]:
    from lmgrad.models.loading import param_shapes

    return {n: jax.ShapeDtypeStruct(s, dtype) for n, s in param_shapes(config).items()}


def _abstract_model(config: Any, params: Mapping[str, Any]) -> Any:
    from lmgrad.models.loading import LoadedModel, build_module
    from lmgrad.params import unflatten

    return LoadedModel(spec="plan", config=config, module=build_module(config), params=unflatten(dict(params)),
                       tokenizer=None, hf_config=None, provenance={})


def _factor_shapes(factored: Any) -> dict[str, Any]:
    """Abstract {module: (P_out, P_in)} of the sketched modules (what `factors()` would allocate)."""
    from lmgrad.grads.factored import factor_matrices

    want = {e["name"] for e in factored.block_layout}
    used = [m for m in factored.modules.values() if want & {m.weight, m.bias}]
    return jax.eval_shape(lambda: {m.prefix: factor_matrices(factored.spec, m) for m in used})


def _tree_bytes(tree: Any) -> int:
    return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _measure(job: str, config: Any, mesh: Any, opts: Any, rows: int, seq_len: int, dtype: Any,
             optimizer_moments: int, pack: bool = True) -> dict[str, float]:
    """Per-device byte counts of one compiled stage function (no allocation); `rows` are pairs
    (sketch, probe) or sentences (evaluate), the probe's packed (`pack`) as its tuning step packs them."""
    params = _abstract_params(config, dtype)
    shardings = sharding.param_shardings(params, mesh)
    parameters = sharding.shard_bytes(params, shardings)
    sketch_state = 0
    if job == "sketch":
        from lmgrad.jobs.sketch import build_sketcher

        model = _abstract_model(config, params)
        sk = build_sketcher(model, opts, mesh=mesh)
        prepare = None
        if opts.method == "factored":
            factors = _factor_shapes(sk.fn.factored)
            sketch_state = _tree_bytes(factors)
            prepare = lambda p: (p, factors)  # noqa: E731
        from lmgrad.jobs.sketch import packed_shape, packs

        if packs(opts):  # `rows` pairs of two `seq_len`-token sentences, packed as the sketch stage packs them
            row_len, n_rows = packed_shape([2 * seq_len], rows)
            compiled = sk.packed.lower_shapes(model.params, n_rows, row_len, prepare,
                                              slots=max(1, row_len // (2 * seq_len))).compile()
        else:
            compiled = sk.fn.lower_shapes(model.params, rows, seq_len, prepare).compile()
    elif job == "probe":  # one tuning step: `rows` pairs of two `seq_len`-token sentences
        from lmgrad.tasks import packed_pair_shape

        if pack:
            row_len, n_rows = packed_pair_shape([2 * seq_len], rows)
            compiled = _stage_fn(job, config, mesh, params, shardings, n_rows, row_len)
        else:
            compiled = _stage_fn(job, config, mesh, params, shardings, 2 * rows, seq_len)
    else:
        compiled = _stage_fn(job, config, mesh, params, shardings, rows, seq_len)
    mem = compiled.memory_analysis()
    args = int(mem.argument_size_in_bytes)
    out = int(mem.output_size_in_bytes)
    # The probe's output is its gradient (parameter-shaped working memory), not a result to keep.
    return {"parameters": parameters, "activations": int(mem.temp_size_in_bytes) + (out if job == "probe" else 0),
            "sketch": out + sketch_state if job == "sketch" else (out if job == "evaluate" else 0),
            "inputs": max(args - parameters - sketch_state, 0),
            "optimizer": optimizer_moments * _fp32_bytes(params, shardings) if job == "probe" else 0}


def _fp32_bytes(params: Mapping[str, Any], shardings: Mapping[str, Any]) -> int:
    return sharding.shard_bytes({n: jax.ShapeDtypeStruct(p.shape, jnp.float32) for n, p in params.items()}, shardings)


def _stage_fn(job: str, config: Any, mesh: Any, params: Mapping[str, Any], shardings: Mapping[str, Any],
              rows: int, seq_len: int) -> Any:
    """The compiled forward (evaluate: sentence log-probs) or batch gradient (probe: one tuning step's
    gradient of the summed differential) on the mesh, batch over `data`, parameters by the rules."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from lmgrad.models.loading import build_module
    from lmgrad.params import unflatten
    from lmgrad.scoring import sequence_logprob

    module = build_module(config)
    data = NamedSharding(mesh, P(sharding.DATA))
    rows = sharding.rows_for(rows, mesh)
    ids = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=data)
    mask = jax.ShapeDtypeStruct((rows, seq_len), jnp.float32, sharding=data)
    abstract = {n: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=shardings[n]) for n, p in params.items()}

    def logprob(p, i, m):
        logits = module.apply({"params": unflatten(p)}, i, m.astype(jnp.int32))
        return sequence_logprob(logits, i, m)

    if job == "evaluate":
        fn = jax.jit(logprob, out_shardings=data)
    else:
        fn = jax.jit(jax.grad(lambda p, i, m: jnp.sum(logprob(p, i, m))), out_shardings=shardings)
    return fn.lower(abstract, ids, mask).compile()


def plan(model: str, *, job: str = "sketch", mesh: str = "", num_devices: int | None = None, sketch: Any = None,
         seq_len: int = 64, batch_size: int = 16, dtype: str = "float32", device_memory_gb: float | None = None,
         depth: str = "full", fit: bool = True, optimizer: str = "adam", task_batch: int = 1,
         pack: bool = True) -> Plan:
    """The per-device memory plan of `job` for `model` (see the module docstring); nothing is read
    but config.json and nothing is allocated.

    `sketch` is a `lmgrad.jobs.sketch.SketchOptions` (method auto is resolved from the parameter
    count); `batch_size` is pairs per batch (sentences for evaluate); `optimizer`/`task_batch`/`pack`
    are the probe stage's (its task_batch tuned copies each hold parameters and moments; its step's
    pairs packed into rows or padded, `ProbeOptions.pack`). `fit=False`
    compiles one batch size only (half the compiles; no per-row cost, no largest batch).
    """
    from lmgrad.jobs.sketch import SketchOptions
    from lmgrad.models.config import from_hf_config

    if job not in JOBS:
        raise ValueError(f"plan: job {job!r} not in {JOBS}")
    if depth not in ("probe", "full"):
        raise ValueError(f"plan: depth must be 'probe' or 'full', got {depth!r}")
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"plan: seq_len ({seq_len}) must be >= 2 and batch_size ({batch_size}) >= 1")
    config = from_hf_config(hf_config(model))
    dt = jnp.dtype(dtype)
    m = sharding.mesh_from_spec(mesh, num_devices)
    num_params = int(sum(int(np.prod(s.shape)) for s in _abstract_params(config, dt).values()))
    opts = (sketch or SketchOptions()).resolve(num_params=num_params) if job == "sketch" else None
    moments = {"adam": 2, "adamw": 2, "sgd": 0, "momentum": 1}.get(optimizer, 2)
    rows1 = batch_size
    rows2 = 2 * batch_size

    def at(layers: int, rows: int) -> dict[str, float]:
        cfg = dataclasses.replace(config, num_layers=layers)
        return _measure(job, cfg, m, opts, rows, seq_len, dt, moments, pack)

    full = at(config.num_layers, rows1) if depth == "full" else None

    def deep(rows: int) -> dict[str, float]:
        if depth == "full":
            return full if rows == rows1 else at(config.num_layers, rows)
        one, two = at(1, rows), at(2, rows)
        return {k: one[k] + (two[k] - one[k]) * (config.num_layers - 1) for k in one}

    base = deep(rows1)
    big = deep(rows2) if fit else base
    per_row = {k: (big[k] - base[k]) / (rows2 - rows1) for k in base}
    if depth != "full":
        # Parameters (and moments) are exact at full depth; no extrapolation needed.
        params = _abstract_params(config, dt)
        shardings = sharding.param_shardings(params, m)
        base["parameters"] = sharding.shard_bytes(params, shardings)
        base["optimizer"] = moments * _fp32_bytes(params, shardings) if job == "probe" else 0
        per_row["parameters"] = per_row["optimizer"] = 0.0
    copies = task_batch if job == "probe" else 1
    base = {k: int(round(v)) for k, v in base.items()}
    if copies > 1:  # the probe's vmapped step holds task_batch tuned copies
        base["parameters"] *= copies
        base["optimizer"] *= copies
    limit = int(device_memory_gb * GIB) if device_memory_gb else device_memory()
    method = opts.method if opts is not None else ("forward" if job == "evaluate" else f"grad+{optimizer}")
    p = Plan(model=model, job=job, method=method, mesh=dict(m.shape), seq_len=seq_len, batch_size=batch_size,
             num_params=num_params, per_row=max(sum(per_row.values()), 0.0), device_bytes=limit, max_batch=None,
             depth=depth, host_peak_rss=peak_rss(), **base)
    return dataclasses.replace(p, max_batch=p.fits(limit)) if (limit and fit) else p


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# --------------------------------------------------------------------------------- launchers
def define_flags() -> None:
    """The --dry_run flags every model-loading launcher shares."""
    from absl import flags

    flags.DEFINE_bool("dry_run", False, "Print the per-device memory plan (lmgrad.plan) from config.json (or a GGUF header; a packaged GGUF is "
                      "fetched if not cached) alone "
                      "and exit: no weights are read. --model may also be a shape name: " + ", ".join(SHAPES))
    flags.DEFINE_float("device_memory_gb", None, "--dry_run: device memory to fit (default: the device's own).")
    flags.DEFINE_integer("dry_run_seq_len", 64, "--dry_run: tokens per sentence to plan for.")
    flags.DEFINE_enum("dry_run_depth", "full", ["probe", "full"], "--dry_run: compile the full depth, or 1- and "
                      "2-block variants and extrapolate (probe: faster, approximate activations).")


def dry_run(job: str, inputs: Any, *, sketch: Any = None, batch_size: int = 16, optimizer: str = "adam",
            task_batch: int = 1, pack: bool = True, num_devices: int | None = None) -> Plan:
    """The plan for a launcher's options, printed (with its JSON form) and returned."""
    from absl import flags

    f = flags.FLAGS
    p = plan(inputs.model, job=job, mesh=inputs.mesh, num_devices=num_devices, sketch=sketch,
             seq_len=f.dry_run_seq_len, batch_size=batch_size, dtype=inputs.dtype,
             device_memory_gb=f.device_memory_gb, depth=f.dry_run_depth, optimizer=optimizer, task_batch=task_batch,
             pack=pack)
    print(p.table())
    print(json.dumps(p.to_dict()))
    return p

