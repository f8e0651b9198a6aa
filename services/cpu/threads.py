"""How many threads torch computes with: the container's CPU quota, not the host's core count.

torch sizes its pool to every core the host shows; in a container limited to fewer CPUs the extra threads
are throttled and wait on each other at every matmul. Reading the quota is plain file parsing, so every
function here takes the paths or texts it reads and is testable without a cgroup.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from services.errors import InvalidSettingError

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "quota period" or "max period"
CFS_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")  # cgroup v1: -1 when unlimited
CFS_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _cpus(quota: str, period: str) -> int | None:
    """Whole CPUs a quota allows (rounded up: a half CPU still needs a thread); None when unlimited or unreadable."""
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return math.ceil(quota_us / period_us)


def quota_from_cpu_max(text: str) -> int | None:
    """CPUs in a cgroup v2 `cpu.max` text."""
    fields = text.split()
    return _cpus(fields[0], fields[1]) if len(fields) == 2 else None


def quota_from_cfs(quota_text: str, period_text: str) -> int | None:
    """CPUs in cgroup v1's `cpu.cfs_quota_us` and `cpu.cfs_period_us` texts."""
    return _cpus(quota_text.strip(), period_text.strip())


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_cpu_quota(cpu_max: Path = CPU_MAX, cfs_quota: Path = CFS_QUOTA, cfs_period: Path = CFS_PERIOD) -> int | None:
    """The CPU quota of this process's cgroup in whole CPUs (v2 first, then v1); None when there is none."""
    text = _read(cpu_max)
    if text is not None:
        return quota_from_cpu_max(text)
    quota, period = _read(cfs_quota), _read(cfs_period)
    return quota_from_cfs(quota, period) if quota is not None and period is not None else None


def affinity_count() -> int:
    """CPUs this process may run on (a cpuset or taskset narrows it below the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_threads(setting: int | None, *, environ: Mapping[str, str], quota: int | None,
                   affinity: int) -> tuple[int, str]:
    """The thread count and where it came from: the setting, else OMP_NUM_THREADS, else the cgroup quota
    (never above the CPUs this process may use), else those CPUs."""
    if setting is not None:
        if setting < 1:
            raise InvalidSettingError(f"threads must be at least 1, not {setting}", param="threads")
        return setting, "the threads setting"
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    if quota is not None:
        return max(1, min(quota, affinity)), "the cgroup CPU quota"
    return max(1, affinity), "the CPUs this process may use"


def serving_threads(setting: int | None) -> tuple[int, str]:
    """`choose_threads` on this machine's environment, cgroup and affinity."""
    return choose_threads(setting, environ=os.environ, quota=cgroup_cpu_quota(), affinity=affinity_count())
