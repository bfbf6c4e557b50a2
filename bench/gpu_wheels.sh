#!/usr/bin/env bash
# Wheels of the packages lmgrad needs that this workplace's GPU image lacks, into .whl/ (git-ignored),
# for bench/gpu_run.sh on a machine without network: carry .whl along (device tool: carry=[".whl"]).
#
#   bash bench/gpu_wheels.sh        # from the repository root, where pip reaches PyPI
#
# Both are pure-Python wheels (py3-none-any), so the target's Python version and platform do not matter;
# their own dependencies (absl-py, PyYAML, numpy, tqdm) are in the image.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p .whl
for req in $(grep -E '^(ml-collections|gguf)==' requirements.txt); do
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "$req"
done
ls -la .whl
