"""Choosing which parameters to differentiate, by patterns over Hugging Face names.

Pattern syntax: a plain pattern is a shell-style glob matched against the whole HF name with
`fnmatch.fnmatchcase` (case-sensitive; `*` also crosses dots, so `*.mlp.*` matches every MLP
tensor of every layer). A pattern starting with ``re:`` is a Python regular expression that
must match the whole name (`re.fullmatch`), e.g. ``re:model\\.layers\\.(1|3)\\..*``.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Iterable, Mapping, Sequence

from lmgrad.models.loading import flatten_params

# Where each supported family keeps its list of transformer blocks.
_LAYER_PREFIXES = ("transformer.h", "model.layers", "gpt_neox.layers")


def _matches(name: str, pattern: str) -> bool:
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
    return [f"{p}.{i}.*" for i in range(start, stop + 1) for p in _LAYER_PREFIXES]


def select_params(
    names: Iterable[str],
    include: Sequence[str] | str | None,
    exclude: Sequence[str] | str | None = None,
) -> list[str]:
    """Names matching any `include` pattern (all names if None) and no `exclude` pattern.

    Order follows `names`. Patterns are globs, or regexes prefixed with ``re:`` (module docstring).

    Raises:
      ValueError: the selection is empty; the message names the patterns and a few names.
    """
    names = list(names)
    inc = [include] if isinstance(include, str) else include
    exc = [exclude] if isinstance(exclude, str) else (exclude or [])
    out = [
        n for n in names
        if (inc is None or any(_matches(n, p) for p in inc)) and not any(_matches(n, p) for p in exc)
    ]
    if not out:
        sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ValueError(
            f"no parameter selected by include={list(inc) if inc is not None else None} "
            f"exclude={list(exc)} among {len(names)} names ({sample})"
        )
    return out


def split_params(params: Mapping[str, Any], selected: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable, frozen) flat HF-named dicts from nested Flax (or already flat) params.

    Raises:
      KeyError: a selected name is not a parameter of the model (named in the message).
    """
    flat = flatten_params(params)
    missing = [n for n in selected if n not in flat]
    if missing:
        raise KeyError(f"selected parameters not in the model: {missing[:10]}")
    chosen = set(selected)
    trainable = {n: flat[n] for n in selected}
    frozen = {n: v for n, v in flat.items() if n not in chosen}
    return trainable, frozen
