"""The machine a measurement ran on, and process memory read from /proc."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any


def _first(path: str, prefix: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def describe() -> dict[str, Any]:
    mem_kb = _first("/proc/meminfo", "MemTotal")
    try:
        ram_gib = round(int(mem_kb.split()[0]) / 1024 / 1024, 1)
    except (ValueError, IndexError):
        ram_gib = 0.0
    return {"nproc": os.cpu_count(), "cpu": _first("/proc/cpuinfo", "model name"), "ram_gib": ram_gib,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (0 if it is gone)."""
    try:
        return int(_first(f"/proc/{pid}/status", "VmRSS").split()[0])
    except (ValueError, IndexError):
        return 0


def children(pid: int) -> list[int]:
    """Direct children of a process (uvicorn workers, the embedded Valkey)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # the name may contain spaces; fields after it are fixed
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_wait_s(pid: int) -> float:
    """Seconds the process's main thread spent runnable but waiting for a CPU (from /proc schedstat):
    on a shared machine, the share of time a server or a load worker was starved."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0
