"""Options dataclasses as the one schema of every stage: to and from dicts, configs and flags.

Each stage's options are a frozen dataclass whose field defaults are the only place a default is
written. Configs (`configs/*.py`) are built from them with `to_config`, absl flags are defined
from them with `define_flags` (so a flag's default *is* the field's default), and both turn back
into options with `from_dict` / `from_flags`. A field's help text and allowed values live in its
metadata (`option(...)`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with a default, a help text and (for strings) its allowed values."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=meta)


def nested(cls: type, help: str) -> Any:
    """A field holding another options dataclass (default: its own defaults)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "choices": None})


def check_choices(obj: Any) -> None:
    """Raises ValueError naming the field when a string field is not one of its `choices`."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices and value not in choices:
            raise ValueError(f"{type(obj).__name__}.{f.name}={value!r}; valid: {', '.join(choices)}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` (from JSON, a ConfigDict or a flag) as type `tp`: lists become tuples, recursively."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: None is not allowed")
    if _is_dataclass_type(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where=where)
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a sequence, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ValueError(f"{where}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str | None = None) -> T:
    """Options of type `cls` from a mapping (a ConfigDict's `to_dict()`, JSON, ...).

    Missing keys take the dataclass default; an unknown key is an error that names it.
    """
    where = where or cls.__name__
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def differences(want: Any, got: Any, where: str = "", *, got_name: str = "run", want_name: str = "sweep") -> list[str]:
    """Dotted field paths where two plain (JSON-like) records differ, each with both values."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for k in sorted(set(want) | set(got)):
            w = f"{where}.{k}" if where else k
            if k not in got:
                out.append(f"{w} (missing in the {got_name})")
            elif k not in want:
                out.append(f"{w} (unknown to the {want_name})")
            else:
                out += differences(want[k], got[k], w, got_name=got_name, want_name=want_name)
        return out
    return [] if want == got else [f"{where}: {got_name} has {got!r}, {want_name} has {want!r}"]


def to_dict(obj: Any) -> dict[str, Any]:
    """Options as plain nested dicts (tuples kept)."""
    return {f.name: (to_dict(getattr(obj, f.name)) if dataclasses.is_dataclass(getattr(obj, f.name))
                     else getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def to_config(obj: Any) -> Any:
    """Options as an `ml_collections.ConfigDict` (for `configs/*.py`), overridable from the command
    line as `--config.section.field=value` (an optional field that is None becomes a typed
    placeholder, so it can still be set from the command line)."""
    import ml_collections
    from ml_collections import config_dict

    def convert(o: Any) -> dict[str, Any]:
        hints = _hints(type(o))
        out: dict[str, Any] = {}
        for f in dataclasses.fields(o):
            v = getattr(o, f.name)
            if dataclasses.is_dataclass(v):
                out[f.name] = ml_collections.ConfigDict(convert(v))
            elif v is None:
                tp, _ = _strip_optional(hints[f.name])
                out[f.name] = config_dict.placeholder(tp)
            else:
                out[f.name] = v
        return out

    return ml_collections.ConfigDict(convert(obj))


# ---------------------------------------------------------------------------- absl flags

def _flag_format(value: Any) -> Any:
    """A tuple-of-tuples default such as (("*.v_proj.weight", 8, 128),) as a flag list."""
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return [":".join(str(x) for x in v) for v in value]
    if isinstance(value, tuple):
        return list(value)
    return value


def _parse_entry(text: str, args: tuple[Any, ...], name: str) -> tuple[Any, ...]:
    # Split from the right so that a pattern may itself contain ':' (e.g. "re:...").
    parts = text.rsplit(":", len(args) - 1)
    if len(parts) != len(args):
        raise ValueError(f"--{name} entry {text!r}: expected {len(args)} ':'-separated fields")
    out = []
    for p, a in zip(parts, args):
        try:
            out.append(a(p) if a in (int, float) else p)
        except ValueError:
            raise ValueError(f"--{name} entry {text!r}: {p!r} is not {a.__name__}") from None
    return tuple(out)


def define_flags(cls: type, *, skip: tuple[str, ...] = (), flag_values: Any = None) -> list[str]:
    """Defines one absl flag per field of `cls` (defaults and help from the dataclass); returns
    the flag names. Nested option dataclasses are not flattened (use a config file for those)."""
    from absl import flags

    fv = flag_values or flags.FLAGS
    defaults = cls()
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _strip_optional(_hints(cls)[f.name])
        default = getattr(defaults, f.name)
        help_ = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if tp is bool:
            flags.DEFINE_bool(f.name, default, help_, flag_values=fv)
        elif tp is int:
            flags.DEFINE_integer(f.name, default, help_, flag_values=fv)
        elif tp is float:
            flags.DEFINE_float(f.name, default, help_, flag_values=fv)
        elif tp is str and choices:
            flags.DEFINE_enum(f.name, default, list(choices), help_, flag_values=fv)
        elif tp is str:
            flags.DEFINE_string(f.name, default, help_, flag_values=fv)
        elif typing.get_origin(tp) is tuple:
            flags.DEFINE_list(f.name, _flag_format(default), help_, flag_values=fv)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {tp}")
        names.append(f.name)
    return names


def from_flags(cls: type[T], flag_values: Any = None, *, skip: tuple[str, ...] = (), **extra: Any) -> T:
    """Options of type `cls` from the parsed flags `define_flags(cls)` made (plus `extra` fields)."""
    from absl import flags

    fv = flag_values or flags.FLAGS
    hints = _hints(cls)
    kwargs: dict[str, Any] = dict(extra)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in extra:
            continue
        value = fv[f.name].value
        tp, _ = _strip_optional(hints[f.name])
        if typing.get_origin(tp) is tuple and value is not None:
            args = typing.get_args(tp)
            inner = args[0]
            if typing.get_origin(inner) is tuple:
                value = tuple(_parse_entry(v, typing.get_args(inner), f.name) for v in value)
            else:
                value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)
