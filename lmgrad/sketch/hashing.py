"""Counter-based generators for projection entries: a pure function of (seed, name, row, column).

Every entry of a projection matrix is computed from a 32-bit integer hash of its coordinates, so any
block of columns can be regenerated on demand, in any chunking, on any device, with identical bits.
This replaces ``jax.random`` on the hot path: on a 2-core CPU the threefry generator makes ~0.1 G
normals/s and ``rbg`` is slower still, while the hash below makes ~2 G Rademacher signs/s including
the contraction (see ``bench/bench_projectors.py``). ``rbg`` outputs are also not promised stable
across backends or JAX versions, which would break "same seed, same sketch" in a stored run.

Layout of the hash (``GENERATOR_VERSION`` names it; change the version string if the bits change):

* per (seed, parameter name, stream): three 32-bit keys from BLAKE2b — stable across processes, never
  Python's salted ``hash()``;
* per column ``c``: ``colh = mix(c ^ key0)``;
* per row ``r``: ``rowh = r * 0x9E3779B9 + key1`` (``key2`` for the second Box–Muller uniform);
* entry: ``mix(colh ^ rowh)`` with ``mix`` = lowbias32 (Wellons), a bijective avalanche mix.

The numpy twins (``np_*``) are the slow, independent references used by ``dense_matrix`` and tests:
they redo the integer hash in numpy and the Gaussian transform in float64 with ``np.cos``.
"""
from __future__ import annotations

import hashlib
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

GENERATOR_VERSION = "lmgrad.sketch.hash32/v1"
MAX_COLUMNS = 2**31  # column counters are uint32; slice offsets int32

_GOLDEN = 0x9E3779B9
_M1 = 0x7FEB352D
_M2 = 0x846CA68B


def param_keys(seed: int, name: str, stream: str) -> tuple[int, int, int]:
    """Three 32-bit keys for one (seed, parameter name, stream); a stable, process-independent hash."""
    msg = f"{GENERATOR_VERSION}|{stream}|{int(seed)}|{name}".encode()
    d = hashlib.blake2b(msg, digest_size=12).digest()
    return tuple(int.from_bytes(d[i : i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]


def keys_array(keys: tuple[int, int, int]) -> np.ndarray:
    return np.asarray(keys, dtype=np.uint32)


# ----------------------------------------------------------------------------------------- jnp path
def _u32(x: int) -> jnp.ndarray:
    return jnp.uint32(x)


def mix32(h: jnp.ndarray) -> jnp.ndarray:
    """lowbias32: a bijective uint32 -> uint32 mix with near-ideal avalanche."""
    h = h ^ (h >> 16)
    h = h * _u32(_M1)
    h = h ^ (h >> 15)
    h = h * _u32(_M2)
    return h ^ (h >> 16)


def column_hash(c0: jnp.ndarray, width: int, key0: jnp.ndarray) -> jnp.ndarray:
    """uint32[width] hashes of columns c0, c0+1, ..., c0+width-1."""
    cols = c0.astype(jnp.uint32) + jnp.arange(width, dtype=jnp.uint32)
    return mix32(cols ^ key0)


def _row_hash(rows: int, key: jnp.ndarray) -> jnp.ndarray:
    return jnp.arange(rows, dtype=jnp.uint32) * _u32(_GOLDEN) + key


def rademacher_block(keys: jnp.ndarray, c0: jnp.ndarray, rows: int, width: int) -> jnp.ndarray:
    """float32[rows, width] of exact ±1 for columns [c0, c0+width)."""
    colh = column_hash(c0, width, keys[0])
    h = mix32(colh[None, :] ^ _row_hash(rows, keys[1])[:, None])
    # The sign bit of the hash becomes the sign bit of 1.0f: no compare, no select.
    bits = _u32(0x3F800000) | (h & _u32(0x80000000))
    return lax.bitcast_convert_type(bits, jnp.float32)


def _sincos_2pi_u(h: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(cos 2πu, sin 2πu) for u = (h >> 8)·2⁻²⁴, by quadrant + Taylor polynomials.

    XLA's CPU cos/sin run at ~0.1 G/s here and dominate Box–Muller; the top two bits of h give the
    quadrant exactly, leaving φ ∈ [0, π/2) where degree-11/12 Taylor series are below float32 eps.
    """
    quadrant = h >> 30
    phi = ((h >> 8) & _u32(0x3FFFFF)).astype(jnp.float32) * np.float32(math.pi / 2 * 2.0**-22)
    p2 = phi * phi
    s = phi * (1 + p2 * (-1 / 6 + p2 * (1 / 120 + p2 * (-1 / 5040 + p2 * (1 / 362880 + p2 * (-1 / 39916800))))))
    c = 1 + p2 * (-1 / 2 + p2 * (1 / 24 + p2 * (-1 / 720 + p2 * (1 / 40320 + p2 * (-1 / 3628800 + p2 / 479001600)))))
    q1 = (quadrant & 1) == 1
    q2 = (quadrant & 2) == 2
    cos_ = jnp.where(q1, -s, c)
    sin_ = jnp.where(q1, c, s)
    return jnp.where(q2, -cos_, cos_), jnp.where(q2, -sin_, sin_)


def gaussian_block(keys: jnp.ndarray, c0: jnp.ndarray, rows: int, width: int) -> jnp.ndarray:
    """float32[rows, width] of N(0, 1) for columns [c0, c0+width) by Box–Muller on hashed uniforms.

    Rows 2p and 2p+1 are the cos/sin pair of one Box–Muller draw, so entries do not depend on ``rows``
    (a k-row matrix is a prefix of a larger one).
    """
    pairs = (rows + 1) // 2
    colh = column_hash(c0, width, keys[0])[None, :]
    h1 = mix32(colh ^ _row_hash(pairs, keys[1])[:, None])
    h2 = mix32(colh ^ _row_hash(pairs, keys[2])[:, None])
    # u1 = (2m+1)·2⁻²⁴ with m < 2²³: exact in float32, never 0 or 1, so log is finite.
    u1 = ((h1 >> 9) * _u32(2) + _u32(1)).astype(jnp.float32) * np.float32(2.0**-24)
    r = jnp.sqrt(-2.0 * jnp.log(u1))
    cos_, sin_ = _sincos_2pi_u(h2)
    z = jnp.stack([r * cos_, r * sin_], axis=1).reshape(2 * pairs, width)
    return z[:rows]


def sjlt_targets(keys: jnp.ndarray, c0: jnp.ndarray, k: int, s: int, width: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Rows int32[s, width] and signs float32[s, width] (±1) of the s nonzeros of each column.

    Block construction (Kane–Nelson): nonzero i of a column lives in rows [i·k/s, (i+1)·k/s), so the
    s nonzeros of one column never collide.
    """
    m = k // s
    colh = column_hash(c0, width, keys[0])[None, :]
    h = mix32(colh ^ _row_hash(s, keys[1])[:, None])
    offset = (jnp.arange(s, dtype=jnp.uint32) * _u32(m))[:, None]
    rows = (offset + (h >> 1) % _u32(m)).astype(jnp.int32)
    signs = lax.bitcast_convert_type(_u32(0x3F800000) | (h << 31), jnp.float32)
    return rows, signs


# --------------------------------------------------------------------------------- numpy references
def np_mix32(h: np.ndarray) -> np.ndarray:
    h = h.astype(np.uint32)
    with np.errstate(over="ignore"):
        h ^= h >> np.uint32(16)
        h *= np.uint32(_M1)
        h ^= h >> np.uint32(15)
        h *= np.uint32(_M2)
        h ^= h >> np.uint32(16)
    return h


def _np_colh(keys: tuple[int, int, int], c0: int, width: int) -> np.ndarray:
    cols = np.arange(c0, c0 + width, dtype=np.uint64).astype(np.uint32)
    return np_mix32(cols ^ np.uint32(keys[0]))


def _np_rowh(rows: int, key: int) -> np.ndarray:
    r = np.arange(rows, dtype=np.uint64)
    return ((r * _GOLDEN + key) % 2**32).astype(np.uint32)


def np_rademacher_block(keys: tuple[int, int, int], c0: int, rows: int, width: int) -> np.ndarray:
    h = np_mix32(_np_colh(keys, c0, width)[None, :] ^ _np_rowh(rows, keys[1])[:, None])
    return np.where(h >> np.uint32(31), -1.0, 1.0)


def np_gaussian_block(keys: tuple[int, int, int], c0: int, rows: int, width: int) -> np.ndarray:
    pairs = (rows + 1) // 2
    colh = _np_colh(keys, c0, width)[None, :]
    h1 = np_mix32(colh ^ _np_rowh(pairs, keys[1])[:, None])
    h2 = np_mix32(colh ^ _np_rowh(pairs, keys[2])[:, None])
    u1 = ((h1 >> np.uint32(9)).astype(np.float64) * 2 + 1) * 2.0**-24
    u2 = (h2 >> np.uint32(8)).astype(np.float64) * 2.0**-24
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.empty((2 * pairs, width))
    z[0::2] = r * np.cos(2 * np.pi * u2)
    z[1::2] = r * np.sin(2 * np.pi * u2)
    return z[:rows]


def np_sjlt_matrix(keys: tuple[int, int, int], k: int, s: int, n: int) -> np.ndarray:
    """Dense float64[k, n] with s entries ±1/√s per column (the reference for the scatter path)."""
    m = k // s
    colh = _np_colh(keys, 0, n)[None, :]
    h = np_mix32(colh ^ _np_rowh(s, keys[1])[:, None])
    rows = np.arange(s)[:, None] * m + (h >> np.uint32(1)) % np.uint32(m)
    signs = np.where(h & np.uint32(1), -1.0, 1.0)
    out = np.zeros((k, n))
    cols = np.broadcast_to(np.arange(n), (s, n))
    np.add.at(out, (rows.ravel(), cols.ravel()), signs.ravel() / math.sqrt(s))
    return out
