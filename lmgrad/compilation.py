"""JAX's persistent compilation cache, on by default under the lmgrad cache directory.

A compiled executable is keyed by its HLO, compile options and backend, not by the Python function
or the parameter values, so the cache serves every later process that compiles the same
computation: the next job of a sweep, another checkpoint of the same architecture at the same
batch shapes, a resumed run. `load_model` (and the pretrain stage) call
`enable_compilation_cache()`; it is idempotent.

``$LMGRAD_COMPILATION_CACHE``: unset → ``$LMGRAD_CACHE/jax`` (default ``~/.cache/lmgrad/jax``); a
path → that directory; ``off`` (or ``0``, ``none``, empty) → no persistent cache. A cache directory
already given to JAX (``JAX_COMPILATION_CACHE_DIR`` or `jax.config`) is left as it is. JAX only
writes executables whose compile took at least ``jax_persistent_cache_min_compile_time_secs``
(default 1 s), so small jits do not fill the directory.
"""

from __future__ import annotations

import os
import pathlib

ENV_VAR = "LMGRAD_COMPILATION_CACHE"
_OFF = ("", "0", "off", "none", "false")


def compilation_cache_dir() -> pathlib.Path | None:
    """The directory `enable_compilation_cache` uses by default (from ``$LMGRAD_COMPILATION_CACHE``);
    None when the variable turns the cache off."""
    from lmgrad.models.fetch import cache_dir

    env = os.environ.get(ENV_VAR)
    if env is None:
        return cache_dir() / "jax"
    if env.strip().lower() in _OFF:
        return None
    return pathlib.Path(env).expanduser()


def enable_compilation_cache(path: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Points JAX's persistent compilation cache at `path` (None: `compilation_cache_dir()`) and
    returns the directory in use, or None when the cache is off.

    Without `path`, a directory JAX already has is kept. Otherwise the cache's state is reset,
    because JAX decides whether to use the cache at its first compile: enabling it after earlier
    jits must still work.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    current = jax.config.jax_compilation_cache_dir
    if path is None and current:
        return pathlib.Path(current)
    target = pathlib.Path(path).expanduser() if path is not None else compilation_cache_dir()
    if target is None:
        return None
    if current == str(target):
        return target
    target.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(target))
    cc.reset_cache()
    return target
