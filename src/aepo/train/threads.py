"""Torch's thread count for a run (`trainer.threads`): set once, never more threads than cores."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (narrowed by taskset, cgroups' cpusets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(threads: int = 0, *, cap: int | None = None) -> int:
    """Set torch's intra-op thread count once for the run (`trainer.threads`); returns it.

    0 picks the default: OMP_NUM_THREADS when the environment sets it, else the cores this
    process may use (at most `cap`). Never more threads than cores: on a busy machine an
    oversubscribed step can take 100x longer, one thread per core degrades in proportion.
    Tool workers (the Python sandbox, search) run while the sampler waits for them, so they
    need no cores of their own."""
    import torch

    if threads <= 0:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        threads = int(env) if env.isdigit() and int(env) > 0 else usable_cores()
        if cap:
            threads = min(threads, cap)
    torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()
