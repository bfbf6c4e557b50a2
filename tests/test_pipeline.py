"""Every config parses; the main job runs end to end (smoke variant, on a tiny checkpoint so that
the suite stays fast; the real default runs in `make run`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib

import numpy as np
import pytest
import torch
import transformers

from helpers_launch import run_launcher
from helpers_tokenizer import tiny_tokenizer
from lmgrad.jobs.schema import from_dict
from lmgrad import store as lstore

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_configs_parse(path):
    # Every config file builds its job's options (`options(arg)`) and gives them as a ConfigDict
    # (`get_config(arg)`) that parses back to the same options, in each of its variants.
    mod = _load(path)
    for arg in (None, "smoke"):
        opts = mod.options(arg)
        assert dataclasses.is_dataclass(opts)
        assert from_dict(type(opts), mod.get_config(arg).to_dict()) == opts
    with pytest.raises(ValueError, match="variant"):
        mod.get_config("no_such_variant")


def test_pipeline_smoke_end_to_end(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    tok = tiny_tokenizer()
    cfg = transformers.GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    work = tmp_path / "run"
    argv = [f"--config={ROOT / 'configs/default.py'}:smoke", f"--config.inputs.model={ckpt}",
            "--config.sketch.r_in=4", "--config.sketch.r_out=4", f"--workdir={work}"]
    run_launcher("pipeline", argv)
    assert "Report:" in capsys.readouterr().out
    summary = json.loads((work / "eval/summary.json").read_text())
    assert summary["overall"]["n_pairs"] == 24
    st = lstore.open(work / "sketches")
    assert st.complete and len(st) == 24
    assert st.config["sketch"]["method"] == "factored"
    assert st.config["sketch"]["factored"]["r_in"] == 4  # the command-line override reached the stage
    assert len(st.layout) > 10  # one block per module: per-layer task spaces are possible
    npz = np.load(work / "task_space/task_space.npz", allow_pickle=True)
    assert npz["similarity"].shape == (6, 6)
    stats = json.loads((work / "task_space/stats.json").read_text())
    assert stats
    assert (work / "task_space/report.md").exists() and (work / "task_space/heatmap.png").exists()
    record = json.loads((work / "pipeline.json").read_text())
    assert set(record["timings_s"]) >= {"evaluate", "sketch:sketches", "sketch:sketches_seed1", "task_space", "total"}
    assert record["options"]["inputs"]["model"] == str(ckpt)
    # The sketch-error check compares the task spaces of two projection seeds.
    assert lstore.open(work / "sketches_seed1").config["sketch"]["factored"]["seed"] == 1
    assert stats["sketch_check"] is not None and stats["sketch_check"]["n"] == 15

    # A second run reuses the finished stages (no re-scoring, no re-sketching).
    run_launcher("pipeline", argv)
    again = json.loads((work / "pipeline.json").read_text())
    assert not any(k.startswith("sketch") for k in again["timings_s"]) and "evaluate" not in again["timings_s"]
