"""Small helpers shared by the benchmark scripts: timing, load, memory and machine labels."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return None


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work (no-op on CPU), so wall times cover the work itself."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, Any]:
    """(seconds, result) of one call of ``fn``, CUDA-synchronised before and after."""
    wall, _, out = timed2(fn, device)
    return wall, out


def timed2(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds over all threads, result) of one call of ``fn``."""
    sync(device)
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def basis(device: str, load: list[float] | None) -> tuple[str, str]:
    """Which clock a same-run ratio uses, and why.

    Wall-clock time, unless the run is on the CPU and the 1-minute load average exceeds the cores
    this process may use: then other processes dominate wall time and the ratio uses process
    CPU time (all threads of this process; the wall-clock ratio is still reported).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.device(device).type == "cuda":
        return "wall", "CUDA: wall clock with synchronisation"
    if load is not None and load[0] > cores:
        return "cpu", (f"load average {load[0]:.1f} > {cores} cores: wall times measure the other processes; "
                       "ratio of process CPU time (the wall-clock ratio is reported as well)")
    return "wall", f"load average {load[0] if load else '?'} ≤ {cores} cores: wall clock"


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return float(statistics.median(values))


def rss_bytes() -> int:
    """Current resident set size of this process in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``; KiB on Linux) in bytes."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def cpu_name() -> str:
    """CPU model name from /proc/cpuinfo, or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict[str, Any]:
    """Labels of the machine a run happened on (cores, threads, device name, versions, load)."""
    dev = torch.device(device)
    return {
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": loadavg(),
    }
