"""`pip install .` (a wheel, not an editable install) serves the pages: the static files ship inside
the package, and nothing is read from the checkout.

The wheel is built from a copy of the sources, offline, with the setuptools the test extra installs;
it goes into a venv of its own whose only other path is this venv's site-packages (for the
dependencies: a .pth line adds that folder, and a folder added that way has its own .pth files,
the editable install's among them, ignored). The server runs from a working directory outside the
checkout, so `python -m server` cannot import this checkout's copy either."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import httpx
import pytest

from load.servers import Livesale
from tests.support import DB_PACKAGED, REPO, TEST_SECRET_KEY, redis_db_url

BUILD_TIMEOUT_S = 180


def run(*argv: str | Path, cwd: Path) -> str:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv with livesale installed from its wheel."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("server", "load"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", root / "dist", src, cwd=root)
    (wheel,) = (root / "dist").glob("livesale-*.whl")

    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=root).strip())
    (purelib / "outer-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel, cwd=root)
    return python


def test_the_wheel_carries_the_pages_and_the_scripts(installed: Path, tmp_path: Path) -> None:
    where = run(installed, "-c", "import server, server.config as c; print(server.__file__); print(c.PAGES_DIR)",
                cwd=tmp_path).split()
    venv_dir = installed.parent.parent
    assert all(Path(w).is_relative_to(venv_dir) for w in where), where  # not the checkout's copy
    pages = Path(where[1])
    for name in ("room.html", "console.html", "js/room.js", "js/api.js", "js/signin.js"):
        assert (pages / name).is_file(), f"{name} is missing from the installed package"
    for lua in ("inventory/reserve.lua", "rooms/chat_post.lua", "backends/now_ms.lua"):
        assert (Path(where[0]).parent / lua).is_file(), f"{lua} is missing from the installed package"


async def test_the_installed_server_serves_the_console_and_the_room(installed: Path, tmp_path: Path,
                                                                     redis_url: str) -> None:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    with Livesale(tmp_path / "data", redis_url=redis_db_url(redis_url, DB_PACKAGED), secret_key=TEST_SECRET_KEY,
                  python=str(installed), cwd=cwd) as srv:  # healthy: its jobs process beats too
        async with httpx.AsyncClient(base_url=srv.url, timeout=30, trust_env=False) as client:
            console = await client.get("/console")
            assert console.status_code == 200 and "text/html" in console.headers["content-type"]
            room = await client.get("/rooms/some-room")
            assert room.status_code == 200 and "text/html" in room.headers["content-type"]
            script = await client.get("/static/js/room.js")
            assert script.status_code == 200 and "javascript" in script.headers["content-type"]
            assert script.text == (REPO / "server/static/js/room.js").read_text()
            assert (await client.get("/static/js/nope.js")).status_code == 404
