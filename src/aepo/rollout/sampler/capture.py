"""Capturing a sampler step as a CUDA graph, checked before it is trusted.

`DecodeGraphs`, `SlotGraphs` and `LayerGraphs` each capture steps whose inputs are static
tensors refilled before every replay. A capture runs the step once eagerly (the warm-up), records
it, and replays it once: the replay must give what the eager run gave (`check_replay`), else the
graph is not used. A capture that fails, either way, leaves that step eager with a warning
(`capture_or_warn`), so a graph problem on some card or torch build costs speed, never tokens.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["REPLAY_TOLERANCE", "ReplayMismatch", "capture_graph", "capture_or_warn", "check_replay", "record_graph"]

T = TypeVar("T")

# the largest relative difference (Frobenius norm, per output tensor) between a graph's first
# replay and the eager warm-up of the same step: far above the rounding of a kernel chosen
# differently under capture, far below what a replay reading the wrong memory gives
REPLAY_TOLERANCE = 1e-2


class ReplayMismatch(RuntimeError):
    """A captured graph's first replay differs from the eager run of the same step."""


def _tensors(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_replay(replayed: Any, eager: Any, tolerance: float = REPLAY_TOLERANCE) -> None:
    """Raise ReplayMismatch unless each tensor of `replayed` (a tensor or a tuple of them) has
    the shape, the non-finite entries and, over the finite ones, the values of `eager` within
    `tolerance` (relative to the eager tensor's norm)."""
    replayed, eager = _tensors(replayed), _tensors(eager)
    if len(replayed) != len(eager):
        raise ReplayMismatch(f"the replay gave {len(replayed)} outputs, the eager step {len(eager)}")
    for i, (got, want) in enumerate(zip(replayed, eager)):
        if got.shape != want.shape:
            raise ReplayMismatch(f"output {i} has shape {tuple(got.shape)} replayed, {tuple(want.shape)} eager")
        finite = torch.isfinite(want)
        if not torch.equal(finite, torch.isfinite(got)):
            raise ReplayMismatch(f"output {i} has non-finite values where the eager step has finite ones, or the reverse")
        # in the outputs' own dtype (a step's logits can be large): close values subtract exactly
        error = float(torch.linalg.vector_norm(torch.where(finite, got - want, 0), dtype=torch.float32))
        scale = float(torch.linalg.vector_norm(torch.where(finite, want, 0), dtype=torch.float32))
        if error > tolerance * scale:
            raise ReplayMismatch(f"output {i} differs from the eager step by {error / max(scale, 1e-30):.3g} "
                                 f"(relative; at most {tolerance} allowed)")


def record_graph(run: Callable[[], Any], device: torch.device, pool: Any = None) -> tuple[Any, Any, Any]:
    """Warm `run` up on a side stream (allocator and library handles), then capture it ->
    (graph, its output buffers, the warm-up's output). Both runs write the step's keys and values,
    which a replay writes again. `pool`: a memory pool shared with graphs replayed in capture
    order."""
    with torch.cuda.device(device):  # the model's GPU, whichever is current
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            eager = run()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()  # its own memory pool (or `pool`), freed with it
        # other threads (tool workers, a server's other requests) may use CUDA meanwhile
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = run()
    return graph, out, eager


def capture_graph(run: Callable[[], Any], device: torch.device, pool: Any = None) -> tuple[Any, Any]:
    """Capture `run` (a step whose inputs are static tensors refilled before each replay) as a
    CUDA graph and replay it once -> (graph, its output buffers, holding that replay's result).
    Raises ReplayMismatch when the replay differs from the eager warm-up (`check_replay`)."""
    graph, out, eager = record_graph(run, device, pool)
    graph.replay()
    try:
        check_replay(out, eager)
    except ReplayMismatch as error:
        raise ReplayMismatch(f"its first replay does not give the eager step's result: {error}") from None
    return graph, out


def capture_or_warn(capture: Callable[[], T], what: str) -> T | None:
    """`capture()`, or None after a warning when `what` cannot be captured (an op that is not
    capturable, or a replay that differs from the eager step): the caller then runs it eagerly."""
    try:
        return capture()
    except RuntimeError as error:
        warnings.warn(f"CUDA graph capture of {what} failed ({error}); running it eagerly "
                      "(rollout.decode_graphs=false skips the attempt)", stacklevel=3)
        return None
