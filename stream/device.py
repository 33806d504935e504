"""Where torch backends run, in which precision, with how many threads, and how big a batch fits.

torch is imported inside the functions: the embedded path never pays for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from stream.errors import PresetError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "float16", "bfloat16")
Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True, slots=True)
class Placement:
    """A device and the precision the renderer runs in there (the small networks always run in float32)."""

    device: str        # "cpu" or "cuda:N"
    precision: str     # one of PRECISIONS[1:]

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.precision)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def choose_placement(device: str = "auto", precision: str = "auto") -> Placement:
    """CUDA when asked or available; on it bf16 where the GPU has it, else fp16; float32 on the CPU (half
    precision there is slower and less accurate)."""
    import torch

    if device not in DEVICES:
        raise PresetError(f"unknown device {device!r}; valid devices: {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise PresetError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise PresetError("device 'cuda' was asked for, but torch sees no CUDA GPU")
    chosen = "cuda:0" if device == "cuda" or (device == "auto" and cuda) else "cpu"
    if precision == "auto":
        if chosen == "cpu":
            precision = "float32"
        else:
            precision = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return Placement(chosen, precision)


def set_cpu_threads(threads: int) -> int:
    """torch's intra-op threads, set once and deliberately (0: one per core this process may use)."""
    import torch

    count = threads if threads > 0 else len(os.sched_getaffinity(0))
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def free_memory_bytes(placement: Placement) -> int | None:
    """Free memory of the placement's GPU; None on the CPU (there memory is not what limits a batch)."""
    if not placement.is_cuda:
        return None
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(placement.device))
    return int(free)


def batch_for_memory(bytes_per_item: int, free_bytes: int | None, limit: int, *, headroom: float = 0.8) -> int:
    """The largest batch up to `limit` whose measured per-item memory fits in `headroom` of what is free."""
    if free_bytes is None or bytes_per_item <= 0:
        return limit
    return max(1, min(limit, int(free_bytes * headroom) // bytes_per_item))


def map_in_batches(run: Callable[[Sequence[Item]], list[Result]], items: Sequence[Item], batch: int,
                   on_smaller: Callable[[int], None] | None = None) -> list[Result]:
    """`run` over `items` in batches of `batch`; on CUDA out-of-memory the batch halves and is retried, and
    `on_smaller` hears the new size so that the caller starts from it next time."""
    import torch

    results: list[Result] = []
    start = 0
    while start < len(items):
        part = items[start:start + batch]
        try:
            results.extend(run(part))
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            torch.cuda.empty_cache()
            batch = max(1, batch // 2)
            if on_smaller is not None:
                on_smaller(batch)
            continue
        start += len(part)
    return results
