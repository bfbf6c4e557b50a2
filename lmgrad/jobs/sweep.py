"""A sweep: the main job (evaluate → sketch → task space) over model sizes and checkpoints, then a
cross-run analysis of how the task spaces differ (`lmgrad.analysis.cross_run`).

Layout of a sweep directory:
  `runs/<run>/`   one normal pipeline workdir per (model, checkpoint), with `sweep_run.json` (the
                  options and architecture it was started with, written before its first stage);
  `cross_run/`    report.md, stats.json and figures of the cross-run analysis;
  `sweep.json`    the sweep's options, each run's status and timings.

Every run shares one `PipelineOptions` (same pair sample, same projection seed) and differs only in
its model. Running the sweep again skips finished runs (their `pipeline.json` exists and records
the same options), resumes an interrupted one (the pipeline resumes its sketch stage), and refuses
to mix: a run whose recorded options or checkpoint architecture differ from the sweep's is an
error naming the run and the fields.

Compiled functions across checkpoints. The scorer is jitted once per `LoadedModel` object and the
sketch functions once per sketch stage (a new `jax.jit` of a new closure each time), so every
checkpoint would be traced and compiled again. The sweep keeps one `LoadedModel` per architecture
(`ModelConfig`) and swaps a new checkpoint's parameters into it (same shapes, so the scorer's
compiled buckets serve every checkpoint), and turns on JAX's persistent compilation cache under the
sweep directory, so the sketch stage's XLA programs, identical across checkpoints of one
architecture, are compiled once (also across processes: a resumed sweep reuses them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import time
from typing import Any, Callable, Iterator, Sequence

from lmgrad import io as lio
from lmgrad.jobs import pipeline as pipeline_job
from lmgrad.jobs.pipeline import PipelineOptions
from lmgrad.jobs.probe import ProbeOptions
from lmgrad.jobs.schema import check_choices, differences, nested, option, to_dict

log = logging.getLogger(__name__)

SWEEP_JSON = "sweep.json"
RUN_JSON = "sweep_run.json"
PRETRAIN_ROOT_ENV = "LMGRAD_PRETRAIN_ROOT"
_STEP_DIR = re.compile(r"step_(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9._@+-]+$")


class SweepMismatchError(ValueError):
    """A run directory holds results made with other options or another architecture."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: a model (any `load_model` spec) and what to plot it against."""

    name: str = option("", "Run name (its directory under runs/).")
    model: str = option("", "Model spec: HF dir, hub id[@revision], .gguf file, smollm2, ...")
    size: str = option("", "Size label; runs with one label form a series over step ('' = name).")
    num_params: int | None = option(None, "Parameter count (None: from the loaded model).")
    step: int | None = option(None, "Pre-training step (None: a final model).")

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"RunSpec.name {self.name!r}: use letters, digits and . _ @ + - only")
        if not self.model:
            raise ValueError(f"RunSpec {self.name!r}: model is empty")


@dataclasses.dataclass(frozen=True)
class CrossRunOptions:
    """How runs are compared (lmgrad.analysis.cross_run)."""

    n_boot: int = option(200, "Joint bootstrap resamples of pair IDs (the same resample for every run).")
    seed: int = option(0, "Seed of the bootstrap and the split halves.")
    alpha: float = option(0.05, "Intervals at level 1 - alpha.")
    rsa: str = option("pearson", "Correlation of two task spaces' off-diagonal entries.",
                      choices=("pearson", "spearman"))
    interval: str = option("basic", "Bootstrap interval: basic (2*estimate - quantiles: corrects the "
                           "first-order attenuation by pair noise) or percentile.", choices=("basic", "percentile"))
    n_splits: int = option(20, "Random split halves for each run's noise ceiling.")
    category: str = option("linguistics_term", "Meta column whose shared values define within-category sharing.")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.n_boot < 20:
            raise ValueError(f"CrossRunOptions.n_boot must be >= 20, got {self.n_boot}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"CrossRunOptions.alpha must be in (0, 1), got {self.alpha}")
        if self.n_splits < 1:
            raise ValueError(f"CrossRunOptions.n_splits must be >= 1, got {self.n_splits}")


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """The runs and the options every run shares."""

    runs: tuple[RunSpec, ...] = option((), "Explicit runs.")
    series: tuple[str, ...] = option((), "Local pretrain workdirs (lmgrad.jobs.pretrain; relative to "
                                     "pretrain_root) expanded into one run per selected step: NAME@step_XXXXXX.")
    series_steps: str = option("last", "Steps of each series: last, all, log:N (N log-spaced, first and last "
                               "included) or a comma-separated list.")
    pretrain_root: str = option("", f"Root of relative series dirs ('': ${PRETRAIN_ROOT_ENV}, else runs/pretrain).")
    pipeline: PipelineOptions = nested(PipelineOptions, "Options shared by every run.")
    probe: bool = option(False, "Also run the transfer probe (lmgrad.jobs.probe) in each run (runs/<run>/probe).")
    probe_options: ProbeOptions = nested(ProbeOptions, "Probe options (when probe is on).")
    cross_run: CrossRunOptions = nested(CrossRunOptions, "Cross-run analysis.")
    compile_cache: str = option("auto", "JAX persistent compilation cache: auto (SWEEPDIR/.jax_cache), a "
                                "directory, or '' (off).")

    def __post_init__(self) -> None:
        parse_steps(self.series_steps)  # fails early on a malformed selector

    def root(self) -> pathlib.Path:
        return pathlib.Path(self.pretrain_root or os.environ.get(PRETRAIN_ROOT_ENV, "runs/pretrain"))

    def expand(self) -> list[RunSpec]:
        """The explicit runs, then each series' selected checkpoints; names must be unique."""
        out = list(self.runs)
        for s in self.series:
            path = pathlib.Path(s)
            out += series_runs(path if path.is_absolute() else self.root() / path, self.series_steps)
        seen: dict[str, str] = {}
        for r in out:
            if r.name in seen:
                raise ValueError(f"two runs named {r.name!r} ({seen[r.name]} and {r.model})")
            seen[r.name] = r.model
        if not out:
            raise ValueError("SweepOptions: no runs (set runs or series)")
        return out

    def run_options(self, run: RunSpec) -> PipelineOptions:
        """The pipeline options of one run: the shared ones with the run's model."""
        return dataclasses.replace(self.pipeline, inputs=dataclasses.replace(self.pipeline.inputs, model=run.model))


def parse_steps(selector: str) -> tuple[str, Any]:
    """`last` | `all` | `log:N` | `S1,S2,...` → (kind, value)."""
    s = selector.strip()
    if s in ("last", "all"):
        return s, None
    if s.startswith("log:"):
        try:
            n = int(s[4:])
        except ValueError:
            n = 0
        if n < 2:
            raise ValueError(f"series_steps {selector!r}: log:N needs an integer N >= 2")
        return "log", n
    try:
        steps = tuple(int(x) for x in s.split(","))
    except ValueError:
        raise ValueError(f"series_steps {selector!r}: expected last, all, log:N or a comma-separated list of steps") from None
    return "list", steps


def available_steps(pretrain_dir: str | os.PathLike) -> dict[int, pathlib.Path]:
    """{step: export dir} of a pretrain workdir's finished Hugging Face exports (hf/step_XXXXXX/)."""
    hf = pathlib.Path(pretrain_dir) / "hf"
    if not hf.is_dir():
        raise ValueError(f"{pretrain_dir}: no hf/ directory of exported checkpoints (is it a pretrain workdir? "
                         f"set pretrain_root or ${PRETRAIN_ROOT_ENV})")
    out = {}
    for d in hf.iterdir():
        m = _STEP_DIR.match(d.name)
        # An export is written file by file; config.json and weights together mark a usable one.
        if m and (d / "config.json").exists() and any(d.glob("*.safetensors")):
            out[int(m.group(1))] = d
    if not out:
        raise ValueError(f"{hf}: no finished step_XXXXXX exports")
    return dict(sorted(out.items()))


def select_steps(steps: Sequence[int], selector: str) -> list[int]:
    """The steps `selector` picks from the available `steps` (sorted). `log:N` takes the available
    step nearest (in log(1 + step)) to each of N targets log-spaced from the first to the last."""
    import numpy as np

    steps = sorted(steps)
    kind, value = parse_steps(selector)
    if kind == "last":
        return [steps[-1]]
    if kind == "all":
        return steps
    if kind == "list":
        missing = sorted(set(value) - set(steps))
        if missing:
            raise ValueError(f"steps {missing} are not among the exported steps {steps}")
        return sorted(set(value))
    lo, hi = math.log1p(steps[0]), math.log1p(steps[-1])
    logs = np.log1p(np.asarray(steps, float))
    picked = {steps[int(np.argmin(np.abs(logs - t)))] for t in np.linspace(lo, hi, value)}
    return sorted(picked)


def series_runs(pretrain_dir: str | os.PathLike, selector: str = "last", *, name: str | None = None) -> list[RunSpec]:
    """Runs NAME@step_XXXXXX for the selected exports of a pretrain workdir (NAME: its basename)."""
    path = pathlib.Path(pretrain_dir)
    name = name or path.name
    avail = available_steps(path)
    return [RunSpec(name=f"{name}@step_{s:06d}", model=str(avail[s]), size=name, step=s)
            for s in select_steps(list(avail), selector)]


# ---------------------------------------------------------------------------- running


def _plain(obj: Any) -> Any:
    """Options as JSON values (tuples → lists), for comparing with what a run recorded."""
    return json.loads(json.dumps(obj, default=str))


def _check_recorded(run: RunSpec, path: pathlib.Path, recorded: Any, expected: Any) -> None:
    diffs = differences(expected, _plain(recorded))
    if diffs:
        raise SweepMismatchError(
            f"run {run.name!r} ({path}) was made with other options than this sweep's; differing fields: "
            + "; ".join(diffs[:12]) + (" ..." if len(diffs) > 12 else "")
            + ". Use another sweep directory, or delete the run's directory to redo it.")


# How the layers are executed, not what they compute: a run may resume with another setting.
EXECUTION_FIELDS = ("scan_layers",)


def architecture(model: Any) -> dict[str, Any]:
    """What must match for a run's rows to come from one architecture (its ModelConfig, less the
    execution-only fields)."""
    return {k: v for k, v in _plain(dataclasses.asdict(model.config)).items() if k not in EXECUTION_FIELDS}


def _check_architecture(run: RunSpec, path: pathlib.Path, recorded: dict[str, Any], model: Any) -> None:
    recorded = {k: v for k, v in recorded.items() if k not in EXECUTION_FIELDS}
    diffs = differences(recorded, architecture(model))
    if diffs:
        raise SweepMismatchError(
            f"run {run.name!r}: checkpoint {run.model} is not the architecture the run was started with "
            f"({path}); differing config fields: " + "; ".join(d.replace("run has", "checkpoint has").replace(
                "sweep has", "run started with") for d in diffs[:12]))


_CACHE_FLAGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                "jax_persistent_cache_min_entry_size_bytes")


def _reset_jax_cache() -> None:
    try:  # a process that compiled before the directory was set has already decided "no cache"
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        log.warning("could not reset JAX's compilation cache; the setting may not apply in this process")


@contextlib.contextmanager
def compile_cache(directory: str | os.PathLike | None) -> Iterator[None]:
    """JAX's persistent compilation cache in `directory` (every program, however fast to compile)
    while the block runs; the process's previous settings afterwards. None: no change."""
    if directory is None:
        yield
        return
    import jax

    pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    before = {f: getattr(jax.config, f) for f in _CACHE_FLAGS}
    for f, v in zip(_CACHE_FLAGS, (str(directory), 0.0, 0)):
        jax.config.update(f, v)
    _reset_jax_cache()
    try:
        yield
    finally:
        for f, v in before.items():
            jax.config.update(f, v)
        _reset_jax_cache()


class ModelPool:
    """The last `LoadedModel`, reused for the next checkpoint of the same architecture: its
    parameters, tokenizer and provenance are swapped in, so the scorer it compiled (cached on the
    object) serves every checkpoint of a series. Only one model is held, so a sweep over many
    architectures does not keep them all in memory (series are expanded consecutively)."""

    def __init__(self) -> None:
        self._key: Any = None
        self._model: Any = None

    def load(self, spec: str, dtype: str) -> Any:
        from lmgrad.models import load_model

        new = load_model(spec, dtype=dtype)
        key = (new.config, dtype)
        if self._model is None or key != self._key:
            self._key, self._model = key, new
            return new
        kept = self._model
        kept.params, kept.spec, kept.provenance = new.params, new.spec, new.provenance
        kept.tokenizer, kept.hf_config = new.tokenizer, new.hf_config
        return kept


def _say(msg: str) -> None:
    print(f"[lmgrad sweep] {msg}", flush=True)


def run(options: SweepOptions, workdir: str | os.PathLike, *, progress: bool = True,
        run_pipeline: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Runs every run into WORKDIR/runs/<name>/ (skipping finished ones), then the cross-run
    analysis into WORKDIR/cross_run/; returns what `sweep.json` holds. `run_pipeline` replaces
    `lmgrad.jobs.pipeline.run` (tests use it to interrupt a run)."""
    work = pathlib.Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    cache = {"auto": str(work / ".jax_cache"), "": None}.get(options.compile_cache, options.compile_cache)
    with compile_cache(cache):
        return _run(options, work, cache, progress, run_pipeline or pipeline_job.run)


def _run(o: SweepOptions, work: pathlib.Path, cache: str | None, progress: bool,
         run_pipeline: Callable[..., Any]) -> dict[str, Any]:
    from lmgrad.analysis import cross_run

    runs = o.expand()
    if o.probe and runs:   # refuse a probe batching the mesh cannot split before any run starts
        from lmgrad.jobs import probe as probe_job

        probe_job.check_mesh(o.run_options(runs[0]).inputs, o.probe_options)
    record: dict[str, Any] = {"options": _plain(dataclasses.asdict(o)), "compile_cache": cache,
                              "runs": {}, "timings_s": {}}
    pool = ModelPool()
    t_start = time.perf_counter()

    def save() -> None:
        lio.write_json(work / SWEEP_JSON, record, default=str)

    for i, spec in enumerate(runs):
        rdir = work / "runs" / spec.name
        popts = o.run_options(spec)
        expected = _plain(to_dict(popts))
        entry: dict[str, Any] = {"dir": str(rdir), "model": spec.model, "size": spec.size or spec.name,
                                 "num_params": spec.num_params, "step": spec.step}
        record["runs"][spec.name] = entry
        done = rdir / "pipeline.json"
        intent = rdir / RUN_JSON
        if intent.exists():
            _check_recorded(spec, intent, json.loads(intent.read_text())["options"], expected)
        if done.exists():
            _check_recorded(spec, done, json.loads(done.read_text())["options"], expected)
        need_probe = o.probe and not (rdir / "probe" / "stats.json").exists()
        if done.exists() and not need_probe:
            entry.update(status="skipped (finished)")
            # The finished run's own timings (its last session), so a re-run keeps them on record.
            entry["timings_s"] = {f"pipeline:{k}": v
                                  for k, v in json.loads(done.read_text()).get("timings_s", {}).items()}
            entry["num_params"] = spec.num_params or _intent_facts(intent).get("num_params")
            _say(f"[{i + 1}/{len(runs)}] {spec.name}: finished, skipped")
            save()
            continue
        _say(f"[{i + 1}/{len(runs)}] {spec.name}: {spec.model}")
        t0 = time.perf_counter()
        model = pool.load(spec.model, popts.inputs.dtype)
        t_load = time.perf_counter() - t0
        if intent.exists():
            _check_architecture(spec, intent, json.loads(intent.read_text())["architecture"], model)
        else:
            rdir.mkdir(parents=True, exist_ok=True)
            lio.write_json(intent, {"run": dataclasses.asdict(spec), "options": expected,
                                    "architecture": architecture(model),
                                    "num_params": int(model.provenance["num_params"])}, default=str)
        entry["num_params"] = spec.num_params or int(model.provenance["num_params"])
        entry["status"] = "running"
        save()
        timings: dict[str, float] = {"load_model": t_load}
        if not done.exists():
            t = time.perf_counter()
            result = run_pipeline(popts, rdir, progress=progress, model=model)
            timings["pipeline"] = time.perf_counter() - t
            timings.update({f"pipeline:{k}": v for k, v in result["timings_s"].items()})
        if o.probe:
            from lmgrad.jobs import probe as probe_job

            t = time.perf_counter()
            probe_job.run(popts.inputs, o.probe_options, rdir / "probe", model=model, progress=progress)
            timings["probe"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        entry.update(status="done", timings_s=timings)
        save()

    t = time.perf_counter()
    records = [cross_run.RunRecord(name=s.name, path=str(work / "runs" / s.name),
                                   size=record["runs"][s.name]["size"],
                                   num_params=record["runs"][s.name]["num_params"], step=s.step)
               for s in runs]
    co = o.cross_run
    if len(records) >= 2:
        cross_run.analyze(records, work / "cross_run", n_boot=co.n_boot, seed=co.seed, alpha=co.alpha,
                          rsa=co.rsa, interval=co.interval, n_splits=co.n_splits, category=co.category)
        record["cross_run"] = str(work / "cross_run")
    else:
        record["cross_run"] = None
        _say("one run: no cross-run analysis")
    record["timings_s"] = {"cross_run": time.perf_counter() - t, "total": time.perf_counter() - t_start}
    save()
    _say(f"done in {record['timings_s']['total']:.0f} s. Cross-run report: {work / 'cross_run' / 'report.md'}")
    return record


def _intent_facts(intent: pathlib.Path) -> dict[str, Any]:
    if not intent.exists():
        return {}
    return {"num_params": json.loads(intent.read_text()).get("num_params")}
