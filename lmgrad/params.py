"""The one home for Hugging Face parameter names: flat ↔ nested params, patterns, layer and type.

Every stage names a parameter by its HF state-dict key (``model.layers.3.mlp.down_proj.weight``).
This module is the only place that knows how those names are built:

* `flatten` / `unflatten`: nested Flax params (``{'model': {'layers_3': ...}}``) ↔ flat HF names.
* `matches` / `select` / `layers`: pattern syntax for choosing parameters. A plain pattern is a
  shell-style glob matched against the whole name with `fnmatch.fnmatchcase` (case-sensitive;
  ``*`` also crosses dots, so ``*.mlp.*`` matches every MLP tensor of every layer). A pattern
  starting with ``re:`` is a Python regular expression that must match the whole name
  (`re.fullmatch`), e.g. ``re:model\\.layers\\.(1|3)\\..*``.
* `param_info`: family, layer index, module path and module type of a name, from one small table
  per family (`FAMILIES`). The types (`TYPES`) are the keys of a factored sketch's rank overrides
  (``("embed", 16, 256)``) and the analysis' groups, so they are stable values.

Numpy/jax free: the store's reader and the analysis import it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any, Iterable, Mapping, Sequence

TYPES = ("embed", "head", "attn", "mlp", "norm", "other")
"""Module types: token/position embeddings, output head, attention, MLP, norms, anything else."""

# Flax names a list of submodules `h_0`, `layers_3`; HF names them `h.0`, `layers.3`.
_LAYER_LISTS = ("h", "layers")
_SUFFIXES = ("weight", "bias", "kernel", "scale")


@dataclasses.dataclass(frozen=True)
class Family:
    """How one model family names its parameters.

    Attributes:
      name: the family's naming scheme: gpt2, gpt_neox, llama (also mistral, qwen2, and gemma3,
        whose names are Llama's plus a few more modules).
      stack: prefix of the transformer blocks; block i's modules are ``f"{stack}.{i}.<module>"``.
      top: module path outside the stack → type (embeddings, final norm, head).
      block: module path inside a block, or its first component → type (the longest match wins).
    """

    name: str
    stack: str
    top: Mapping[str, str]
    block: Mapping[str, str]


# In this order `layers()` lists its patterns (they go into run configs, compared on resume).
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gpt2", "transformer.h",
           {"transformer.wte": "embed", "transformer.wpe": "embed", "transformer.ln_f": "norm", "lm_head": "head"},
           {"attn": "attn", "mlp": "mlp", "ln_1": "norm", "ln_2": "norm"}),
    # Gemma-3 names its parameters like Llama plus two sandwich norms and QK-norms.
    Family("llama", "model.layers",
           {"model.embed_tokens": "embed", "model.norm": "norm", "lm_head": "head"},
           {"self_attn": "attn", "mlp": "mlp", "input_layernorm": "norm", "post_attention_layernorm": "norm",
            "pre_feedforward_layernorm": "norm", "post_feedforward_layernorm": "norm",
            "self_attn.q_norm": "norm", "self_attn.k_norm": "norm"}),
    Family("gpt_neox", "gpt_neox.layers",
           {"gpt_neox.embed_in": "embed", "gpt_neox.final_layer_norm": "norm", "embed_out": "head"},
           {"attention": "attn", "mlp": "mlp", "input_layernorm": "norm", "post_attention_layernorm": "norm"}),
)}
_ALIASES = {"mistral": "llama", "qwen2": "llama", "gemma3": "llama", "gemma3_text": "llama"}

# Names outside the three families (other checkpoints, hand-made layouts): a generic reading.
_GENERIC_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)(?:\.|$)")
_GENERIC_HEADS = ("lm_head", "embed_out", "output")
_GENERIC_EMBEDS = ("wte", "wpe", "embed_tokens", "embed_in", "word_embeddings", "position_embeddings",
                   "embed_positions")
_GENERIC_ATTN = ("attn", "self_attn", "attention")


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """Where an HF parameter sits.

    Attributes:
      name: the HF parameter name.
      family: `Family.name`, or None when the name alone does not say (``lm_head.weight``) or is
        outside the known families.
      layer: index of its transformer block, None outside the stack.
      module: HF path of the owning module (the name without ``.weight``/``.bias``).
      type: one of `TYPES`.
    """

    name: str
    family: str | None
    layer: int | None
    module: str
    type: str

    @property
    def local(self) -> str:
        """Module path inside its block (``mlp.down_proj``); the module itself outside the stack."""
        return local_module(self.module, self.layer)


# ------------------------------------------------------------------------------- flat ↔ nested
def flatten(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested Flax params → flat dict keyed by HF state-dict names (already flat input passes through)."""
    flat: dict[str, Any] = {}

    def rec(prefix: list[str], node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                m = re.fullmatch(r"(\w+?)_(\d+)", k)
                parts = [m.group(1), m.group(2)] if m and m.group(1) in _LAYER_LISTS else [k]
                rec(prefix + parts, v)
        else:
            flat[".".join(prefix)] = node

    rec([], params)
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten`: ``model.layers.3.x`` → ``{'model': {'layers_3': {'x': ...}}}``."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        keys: list[str] = []
        for p in name.split("."):
            if p.isdigit() and keys:
                keys[-1] = f"{keys[-1]}_{p}"
            else:
                keys.append(p)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


# ------------------------------------------------------------------------------------ patterns
def matches(name: str, pattern: str) -> bool:
    """Whether `name` matches `pattern`: a whole-name glob, or ``re:<regex>`` (full match)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def layers(start: int, stop: int) -> list[str]:
    """Glob patterns for every parameter of blocks `start`..`stop` (inclusive) in any family.

    `layers(4, 8)` matches `model.layers.4.*` … `model.layers.8.*`, `transformer.h.4.*` …,
    `gpt_neox.layers.4.*` …; patterns for the other families simply match nothing.
    """
    if start < 0 or stop < start:
        raise ValueError(f"layers({start}, {stop}): need 0 <= start <= stop")
    stacks = [f.stack for f in FAMILIES.values()]
    return [f"{s}.{i}.*" for i in range(start, stop + 1) for s in stacks]


def select(
    names: Iterable[str],
    include: Sequence[str] | str | None,
    exclude: Sequence[str] | str | None = None,
) -> list[str]:
    """Names matching any `include` pattern (all names if None) and no `exclude` pattern.

    Order follows `names`. Patterns as in `matches`.

    Raises:
      ValueError: the selection is empty; the message names the patterns and a few names.
    """
    names = list(names)
    inc = [include] if isinstance(include, str) else include
    exc = [exclude] if isinstance(exclude, str) else (exclude or [])
    out = [
        n for n in names
        if (inc is None or any(matches(n, p) for p in inc)) and not any(matches(n, p) for p in exc)
    ]
    if not out:
        sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ValueError(
            f"no parameter selected by include={list(inc) if inc is not None else None} "
            f"exclude={list(exc)} among {len(names)} names ({sample})"
        )
    return out


def split(params: Mapping[str, Any], selected: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(selected, rest) flat HF-named dicts from nested Flax (or already flat) params.

    Raises:
      KeyError: a selected name is not a parameter of the model (named in the message).
    """
    flat = flatten(params)
    missing = [n for n in selected if n not in flat]
    if missing:
        raise KeyError(f"selected parameters not in the model: {missing[:10]}")
    chosen = set(selected)
    return {n: flat[n] for n in selected}, {n: v for n, v in flat.items() if n not in chosen}


# --------------------------------------------------------------------------- layer and type
def module_of(name: str) -> str:
    """The owning module's path: `name` without its ``.weight``/``.bias`` (``.kernel``/``.scale``)."""
    head, dot, last = name.rpartition(".")
    return head if dot and last in _SUFFIXES else name


def local_module(module: str, layer: int | None) -> str:
    """Path of `module` inside transformer block `layer` (``mlp.down_proj``); `module` if `layer` is None."""
    if layer is None:
        return module
    marker = f".{layer}."
    i = module.find(marker)
    if i >= 0:
        return module[i + len(marker):]
    return module[len(marker) - 1:] if module.startswith(marker[1:]) else module


def family_of(name: str) -> str | None:
    """The family whose names `name` follows, or None (outside the families, or shared: ``lm_head``)."""
    module = module_of(name)
    found = [f.name for f in FAMILIES.values()
             if module.startswith(f.stack + ".") or module in f.top]
    return found[0] if len(found) == 1 else None


def param_info(name: str, family: str | None = None) -> ParamInfo:
    """Family, layer, module and type of an HF parameter name.

    ``model.layers.7.mlp.down_proj.weight`` → (llama, 7, ``model.layers.7.mlp.down_proj``, mlp);
    ``transformer.wte.weight`` → (gpt2, None, ``transformer.wte``, embed). `family` (a family or
    model_type, e.g. from `ModelConfig.family`) resolves names shared by families (``lm_head``);
    by default it is read from the name. Names outside the families get a generic reading (a
    ``layers|h|layer|blocks.N`` stack; type from well-known module names, else ``other``).
    """
    module = module_of(name)
    fam_name = _ALIASES.get(family, family) if family is not None else family_of(name)
    fam = FAMILIES.get(fam_name) if fam_name is not None else None
    if fam is not None:
        if module in fam.top:
            return ParamInfo(name, fam.name, None, module, fam.top[module])
        prefix = fam.stack + "."
        if module.startswith(prefix):
            index, _, local = module[len(prefix):].partition(".")
            if index.isdigit():
                return ParamInfo(name, fam.name, int(index), module, _block_type(fam, local))
    m = _GENERIC_LAYER.search(module)
    layer = int(m.group(1)) if m else None
    return ParamInfo(name, fam.name if fam else None, layer, module, _generic_type(module, layer))


def _block_type(fam: Family, local: str) -> str:
    """Type of a module path inside a block: its own entry, else its first component's."""
    if local in fam.block:
        return fam.block[local]
    return fam.block.get(local.split(".")[0], "other")


def _generic_type(module: str, layer: int | None) -> str:
    parts = module.split(".")
    last = parts[-1]
    if layer is None and last in _GENERIC_HEADS:
        return "head"
    if any(p in _GENERIC_EMBEDS for p in parts):
        return "embed"
    if "norm" in last or last.startswith("ln"):
        return "norm"
    if any(p in _GENERIC_ATTN for p in parts):
        return "attn"
    if "mlp" in parts:
        return "mlp"
    return "other"


def head_weight(family: str) -> str:
    """HF name of the output head's weight in `family` (or model_type), e.g. ``embed_out.weight`` for GPT-NeoX."""
    fam = FAMILIES[_ALIASES.get(family, family)]
    return next(f"{m}.weight" for m, t in fam.top.items() if t == "head")


def block_fields(name: str, family: str | None = None) -> dict[str, Any]:
    """``{"module", "layer", "type"}`` of a layout block named `name` (see `param_info`)."""
    info = param_info(name, family)
    return {"module": info.module, "layer": info.layer, "type": info.type}
