"""The stage options are the one source of every default: dataclasses, configs/default.py and each
launcher's flags agree; configs and flags round-trip; launchers report bad input without a traceback."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import pytest
from absl import flags

from helpers_launch import launcher
from lmgrad.grads import factored
from lmgrad.jobs import EvalOptions, InputOptions, PipelineOptions, SketchOptions, TaskSpaceOptions
from lmgrad.jobs.cli import main_with_clean_errors
from lmgrad.jobs.schema import from_dict, from_flags, to_config, to_dict
from lmgrad.tasks import TaskDataError

ROOT = pathlib.Path(__file__).resolve().parent.parent

# What the main job deliberately sets differently from the library defaults (configs/default.py).
MAIN_JOB_CHOICES = {
    ("inputs", "max_pairs_per_task"): 12,
    ("sketch", "method"): "factored",
    ("task_space", "n_perm"): 2000,
}


def _config_module():
    spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs" / "default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _diff(a, b, prefix=()):
    out = {}
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x):
            out.update(_diff(x, y, prefix + (f.name,)))
        elif x != y:
            out[prefix + (f.name,)] = x
    return out


def test_config_states_only_its_choices():
    mod = _config_module()
    opts = from_dict(PipelineOptions, mod.get_config().to_dict())
    assert opts == mod.options()
    assert _diff(opts, PipelineOptions()) == MAIN_JOB_CHOICES
    smoke = from_dict(PipelineOptions, mod.get_config("smoke").to_dict())
    assert smoke.inputs.max_pairs_per_task == 4 and smoke.task_space.n_perm == 200


def test_factored_defaults_come_from_one_place():
    o = SketchOptions()
    spec = factored.FactoredSpec()
    assert (o.r_in, o.r_out, o.overrides) == (spec.r_in, spec.r_out, tuple(spec.overrides))
    assert (o.r_in, o.r_out, o.overrides) == (factored.DEFAULT_R_IN, factored.DEFAULT_R_OUT,
                                               factored.DEFAULT_OVERRIDES)


@pytest.mark.parametrize("name,classes,required", [
    ("evaluate", (InputOptions, EvalOptions), ["--workdir=w"]),
    ("sketch", (InputOptions, SketchOptions), ["--workdir=w"]),
    ("task_space", (TaskSpaceOptions,), ["--workdir=w", "--store=s"]),
])
def test_launcher_flag_defaults_are_the_dataclass_defaults(name, classes, required):
    with launcher(name, required):
        for cls in classes:
            assert from_flags(cls) == cls(), cls.__name__


def test_pipeline_flag_overrides_reach_the_options():
    argv = [f"--config={ROOT / 'configs/default.py'}", "--workdir=w", "--config.sketch.k=128",
            "--config.sketch.method=exact", "--config.inputs.pair_seed=3", "--config.check_seed=7"]
    with launcher("pipeline", argv):
        opts = from_dict(PipelineOptions, flags.FLAGS.config.to_dict())
    assert opts.sketch.k == 128 and opts.sketch.method == "exact"
    assert opts.inputs.pair_seed == 3 and opts.check_seed == 7
    assert opts.inputs.max_pairs_per_task == 12  # the rest of the main job's config is kept


def test_list_flags_round_trip():
    argv = ["--workdir=w", "--overrides=re:model\\.layers\\.0\\..*:4:8,embed:2:3", "--include=*.mlp.*"]
    with launcher("sketch", argv):
        o = from_flags(SketchOptions)
    assert o.overrides == (("re:model\\.layers\\.0\\..*", 4, 8), ("embed", 2, 3))
    assert o.include == ("*.mlp.*",)


def test_schema_round_trips_and_names_bad_fields():
    o = PipelineOptions(sketch=SketchOptions(include=("*.mlp.*",), overrides=(("embed", 4, 4),)))
    assert from_dict(PipelineOptions, to_config(o).to_dict()) == o
    assert from_dict(PipelineOptions, to_dict(o)) == o
    with pytest.raises(ValueError, match=r"PipelineOptions\.sketch: unknown option\(s\) \['kk'\]"):
        from_dict(PipelineOptions, {"sketch": {"kk": 3}})
    with pytest.raises(ValueError, match=r"PipelineOptions\.sketch\.batch_size: expected an integer"):
        from_dict(PipelineOptions, {"sketch": {"batch_size": "16"}})
    with pytest.raises(ValueError, match=r"similarity='dot'; valid: unbiased, raw, pair"):
        TaskSpaceOptions(similarity="dot")
    with pytest.raises(ValueError, match="check_seed"):
        PipelineOptions(check_seed=0)


def test_resolve_applies_the_auto_rules():
    assert SketchOptions().resolve(num_params=10**6).method == "exact"
    assert SketchOptions().resolve(num_params=10**6).k == 4096
    assert SketchOptions().resolve(num_params=10**9).method == "factored"
    assert SketchOptions().resolve(num_params=10**9).k is None
    assert SketchOptions(projector="factored").resolve(num_params=10).method == "factored"
    assert SketchOptions(projector="identity").resolve(num_params=10).k is None


def test_clean_errors(capsys):
    @main_with_clean_errors
    def main(argv):
        raise TaskDataError("pairs.jsonl:2: malformed JSON")

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog"])
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["prog"])
        assert exit_.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: pairs.jsonl:2: malformed JSON") and "Traceback" not in err
        flags.FLAGS.verbosity = 1  # asks for the traceback: the error propagates
        with pytest.raises(TaskDataError):
            main(["prog"])
    finally:
        flags.FLAGS.unparse_flags()
