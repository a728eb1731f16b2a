"""How many cores this process may keep busy: what sizes the member threads of a worker."""

from __future__ import annotations

import os
from pathlib import Path


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may keep busy: its CPU affinity, capped by a cgroup CPU quota.

    In a container `os.cpu_count()` is the node's core count; a Kubernetes CPU limit is a CFS quota,
    and threads beyond it are throttled. A quota of 1.5 cores counts as 1: a thread throttled in
    every period costs more latency than the half core it would add.
    """
    cores = len(os.sched_getaffinity(0))
    quota = _cpu_quota(cgroup)
    return cores if quota is None else max(1, min(cores, int(quota)))


def _cpu_quota(cgroup: Path) -> float | None:
    """The CFS quota in cores from cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`; None when unlimited or unknown."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        return int(quota) / int(period) if int(quota) > 0 else None
    except ValueError:
        return None
