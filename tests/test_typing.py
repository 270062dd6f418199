"""The code type-checks under `mypy --strict` (pyproject.toml [tool.mypy]): the interfaces between
the room layer, the inventory layer and storage are typed, and stay so."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO


def test_mypy_strict_passes() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy", "server", "load"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
