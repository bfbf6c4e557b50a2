"""On-disk format of a run dir: manifest schema, layout blocks, bfloat16 bit conversions.

Numpy only (the reading side must not need jax). bfloat16 is stored as its uint16 bit pattern in
ordinary ``.npy`` files, so shards memory-map with plain numpy on any machine.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from lmgrad.io import sha256_file
from lmgrad.params import block_fields
from lmgrad.store.errors import StoreCorruptError

FORMAT = "lmgrad.store/1"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
DTYPES = ("float32", "bfloat16")
# On-disk numpy dtype per logical dtype.
STORAGE_DTYPE = {"float32": np.dtype("<f4"), "bfloat16": np.dtype("<u2")}
SHARD_NAME = re.compile(r"^\d{6,}\.(npy|meta\.jsonl)$")
MANIFEST_KEYS = ("format", "config", "k", "dtype", "layout", "total_rows", "shards", "complete")
SHARD_KEYS = ("file", "meta_file", "start", "rows", "sha256")


# ---------------------------------------------------------------------------- bfloat16 bits

def _f64_to_f32_round_to_odd(x: np.ndarray) -> np.ndarray:
    """float64 → float32 rounding to odd, so a later RNE to bfloat16 equals direct RNE.

    Plain float64→float32→bfloat16 rounds twice and can land on the wrong side of a bfloat16 tie
    (e.g. 1 + 2**-8 + 2**-40 → 1.0 instead of 1 + 2**-7). Rounding to odd keeps the sticky bit.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        f = x.astype(np.float32)
        back = f.astype(np.float64)
    bits = f.view(np.uint32).copy()
    finite = np.isfinite(x)
    # Truncate toward zero: one ulp down in magnitude wherever RNE rounded up in magnitude.
    up = finite & (np.abs(back) > np.abs(x))
    bits[up] -= np.uint32(1)
    inexact = finite & (back != x)
    bits[inexact] |= np.uint32(1)
    return bits.view(np.float32)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round any real array to bfloat16 (nearest, ties to even); return the uint16 bit patterns.

    Accepts float16/32/64, integers and ml_dtypes.bfloat16 arrays (passed through bit-exact).
    NaN stays NaN (quiet), overflow becomes ±inf, as in IEEE round-to-nearest.
    """
    x = np.asarray(x)
    if x.dtype.name == "bfloat16":
        return x.view(np.uint16).copy()
    if x.dtype.kind in "iu" or x.dtype == np.float64:
        x32 = _f64_to_f32_round_to_odd(x.astype(np.float64))
    elif x.dtype.kind == "f":
        x32 = x.astype(np.float32)  # float16/float32 → float32 is exact
    else:
        raise TypeError(f"cannot convert dtype {x.dtype} to bfloat16")
    b = x32.view(np.uint32)
    with np.errstate(over="ignore"):
        rounded = (b + (np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(x32)
    if nan.any():  # the add above could carry a NaN payload into the sign bit; force a quiet NaN
        out[nan] = ((b[nan] >> np.uint32(16)) & np.uint32(0x8000)).astype(np.uint16) | np.uint16(0x7FC0)
    return out


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact widening of bfloat16 bit patterns (uint16) to float32: the bits are the high half."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def bf16_nonfinite(bits: np.ndarray) -> np.ndarray:
    """Mask of NaN/Inf bfloat16 bit patterns (exponent all ones)."""
    return (bits & np.uint16(0x7F80)) == np.uint16(0x7F80)


def to_float32(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Convert a stored array (float32 or bfloat16-as-uint16) to float32 for analysis."""
    if dtype == "bfloat16":
        return bf16_bits_to_f32(stored)
    return np.asarray(stored, dtype=np.float32)


# ---------------------------------------------------------------------------- config / layout

def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def dumps(obj: Any, **kw: Any) -> str:
    """JSON text with numpy scalars/arrays converted and NaN refused (it does not round-trip)."""
    return json.dumps(obj, default=_json_default, allow_nan=False, ensure_ascii=False, **kw)


def normalize_json(obj: Any, what: str) -> Any:
    """The value as it will read back from JSON (tuples→lists, int keys→str), for comparison."""
    try:
        return json.loads(dumps(obj))
    except (TypeError, ValueError) as e:
        raise TypeError(f"lmgrad.store: {what} must be JSON-serialisable: {e}") from None


def normalize_layout(layout: Any, k: int, *, tile: bool = False) -> list[dict]:
    """Validated layout blocks ``[{name, offset, size, shape?, module, layer, type, ...}]``.

    Every block: a dict with a unique non-empty name and int offset/size inside ``[0, k)``; blocks
    do not overlap; a ``shape`` has ``size`` elements; other fields are kept. ``module``, ``layer``
    and ``type``, absent from layouts written before blocks carried them, are filled from the name
    (`lmgrad.params.block_fields`).

    ``tile=False`` (what the store writes): None means no layout (``[]``); order is kept and gaps
    are allowed. ``tile=True`` (what the analysis reads): None or ``[]`` means one ``global``
    block of width k; blocks come back sorted by offset and must tile ``[0, k)`` exactly, since a
    gap would silently mis-attribute columns.
    """
    if not layout:
        return [{"name": "global", "offset": 0, "size": int(k), **block_fields("global")}] if tile else []
    out: list[dict] = []
    names: set[str] = set()
    for i, blk in enumerate(layout):
        where = f"layout[{i}]"
        if not isinstance(blk, dict):
            raise TypeError(f"lmgrad.store: {where} must be a dict, got {type(blk).__name__}")
        for key in ("name", "offset", "size"):
            if key not in blk:
                raise ValueError(f"lmgrad.store: {where} is missing field {key!r}")
        name, offset, size = blk["name"], blk["offset"], blk["size"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"lmgrad.store: {where}.name must be a non-empty string, got {name!r}")
        if name in names:
            raise ValueError(f"lmgrad.store: {where}.name {name!r} is duplicated")
        names.add(name)
        for key, v in (("offset", offset), ("size", size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"lmgrad.store: {where}.{key} must be an int, got {v!r}")
        offset, size = int(offset), int(size)
        if offset < 0 or size < 1 or offset + size > k:
            raise ValueError(f"lmgrad.store: {where} ({name!r}) spans [{offset}, {offset + size}) "
                             f"outside [0, k={k})")
        entry = dict(normalize_json(blk, where))
        entry["offset"], entry["size"] = offset, size
        if blk.get("shape") is not None:
            shape = [int(s) for s in blk["shape"]]
            if int(np.prod(shape)) != size:
                raise ValueError(f"lmgrad.store: {where}.shape {shape} has {int(np.prod(shape))} "
                                 f"elements but size is {size}")
            entry["shape"] = shape
        for key, value in block_fields(name).items():
            entry.setdefault(key, value)
        out.append(entry)
    spans = sorted((b["offset"], b["offset"] + b["size"], b["name"]) for b in out)
    for (_, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"lmgrad.store: layout blocks {n0!r} and {n1!r} overlap")
    if tile:
        end = 0
        for start, stop, name in spans:
            if start != end:
                raise ValueError(f"lmgrad.store: layout block {name!r} starts at {start}, expected {end} "
                                 "(blocks must tile the sketch without gaps)")
            end = stop
        if end != k:
            raise ValueError(f"lmgrad.store: layout blocks cover {end} columns but sketches have K={k}")
        out.sort(key=lambda b: b["offset"])
    return out


def _short(v: Any, limit: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def diff_values(stored: Any, given: Any, path: str) -> list[str]:
    """Human-readable differences between two JSON values, as 'path (stored X, given Y)'."""
    if isinstance(stored, dict) and isinstance(given, dict):
        out: list[str] = []
        for key in list(stored) + [k for k in given if k not in stored]:
            sub = f"{path}.{key}"
            if key not in given:
                out.append(f"{sub} (stored {_short(stored[key])}, given <missing>)")
            elif key not in stored:
                out.append(f"{sub} (stored <missing>, given {_short(given[key])})")
            else:
                out.extend(diff_values(stored[key], given[key], sub))
        return out
    if isinstance(stored, list) and isinstance(given, list) and len(stored) == len(given):
        out = []
        for i, (a, b) in enumerate(zip(stored, given)):
            out.extend(diff_values(a, b, f"{path}[{i}]"))
        return out
    # Types compared too: JSON keeps 1 and 1.0 (and true and 1) apart, so should resume.
    if stored != given or type(stored) is not type(given):
        return [f"{path} (stored {_short(stored)}, given {_short(given)})"]
    return []


# ---------------------------------------------------------------------------- manifest

def read_manifest(workdir: Path) -> dict:
    """Load and schema-check manifest.json; errors name the file and the offending field."""
    path = workdir / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"lmgrad.store: no {MANIFEST} in {workdir} (not a run dir, or the "
                                f"writer never started)") from None
    try:
        man = json.loads(text)
    except json.JSONDecodeError as e:
        raise StoreCorruptError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(man, dict):
        raise StoreCorruptError(f"{path}: top level must be an object")
    for key in MANIFEST_KEYS:
        if key not in man:
            raise StoreCorruptError(f"{path}: missing field {key!r}")
    if man["format"] != FORMAT:
        raise StoreCorruptError(f"{path}: field 'format' is {man['format']!r}; this lmgrad reads "
                                f"{FORMAT!r}")
    if man["dtype"] not in DTYPES:
        raise StoreCorruptError(f"{path}: field 'dtype' is {man['dtype']!r}, expected one of {DTYPES}")
    if not isinstance(man["k"], int) or man["k"] < 1:
        raise StoreCorruptError(f"{path}: field 'k' must be a positive int, got {man['k']!r}")
    row = 0
    for i, sh in enumerate(man["shards"]):
        for key in SHARD_KEYS:
            if key not in sh:
                raise StoreCorruptError(f"{path}: shards[{i}] is missing field {key!r}")
        if sh["start"] != row or not isinstance(sh["rows"], int) or sh["rows"] < 1:
            raise StoreCorruptError(f"{path}: shards[{i}] ({sh['file']}) starts at row {sh['start']} "
                                    f"with {sh['rows']} rows; expected contiguous rows from {row}")
        row += sh["rows"]
    if man["total_rows"] is not None and row > man["total_rows"]:
        raise StoreCorruptError(f"{path}: {row} rows committed but total_rows is {man['total_rows']}")
    return man


def check_shard(workdir: Path, entry: dict, k: int, dtype: str, *, verify: bool) -> None:
    """Check a manifest-listed shard exists with the right shape/dtype (and sha256 if `verify`)."""
    path = workdir / entry["file"]
    meta_path = workdir / entry["meta_file"]
    for p in (path, meta_path):
        if not p.is_file():
            raise StoreCorruptError(f"{p}: listed in {workdir / MANIFEST} but missing")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise StoreCorruptError(f"{path}: unreadable .npy ({e})") from None
    want = (entry["rows"], k)
    if arr.shape != want or arr.dtype != STORAGE_DTYPE[dtype]:
        raise StoreCorruptError(f"{path}: holds {arr.dtype}{list(arr.shape)}, manifest says "
                                f"{STORAGE_DTYPE[dtype]}{list(want)}")
    del arr
    if verify:
        got = sha256_file(path)
        if got != entry["sha256"]:
            raise StoreCorruptError(f"{path}: sha256 {got[:12]}… does not match the manifest's "
                                    f"{entry['sha256'][:12]}… (file corrupted or replaced)")
        want_meta = entry.get("meta_sha256")
        if want_meta is not None and sha256_file(meta_path) != want_meta:
            raise StoreCorruptError(f"{meta_path}: sha256 does not match the manifest")
