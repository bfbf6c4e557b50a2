"""Install pip into a virtual environment made with `python3 -m venv --without-pip`.

Debian and Ubuntu ship `ensurepip` in a separate package (python3-venv); without it `python3 -m venv`
fails, while `--without-pip` still works. This fetches pip's wheel from PyPI and runs pip from the
wheel itself to install it (a wheel is importable), so `make` needs nothing from the system but
Python. Run it with the environment's interpreter: `.venv/bin/python tools/bootstrap_pip.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request

INDEX = os.environ.get("LMGRAD_PIP_JSON", "https://pypi.org/pypi/pip/json")


def main() -> None:
    with urllib.request.urlopen(INDEX, timeout=60) as r:
        info = json.load(r)
    wheels = [u for u in info["urls"] if u["filename"].endswith("-py3-none-any.whl")]
    if not wheels:
        sys.exit(f"bootstrap_pip: no pip wheel listed at {INDEX}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, wheels[0]["filename"])
        # A mirror may list the file relative to the JSON page.
        urllib.request.urlretrieve(urllib.parse.urljoin(INDEX, wheels[0]["url"]), path)
        subprocess.run([sys.executable, os.path.join(path, "pip"), "install", "-q", "--no-index", path], check=True)


if __name__ == "__main__":
    main()
