"""Error classification shared by the analysis engine and the app (imports only torch)."""

from __future__ import annotations

import torch

#: substrings of the CPU allocator's failure messages (a plain ``RuntimeError``, not an OOM type)
CPU_OOM_MARKERS = ("can't allocate memory", "out of memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error (``torch.OutOfMemoryError``), ``MemoryError``, or a CPU
    allocator failure (``RuntimeError`` "DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in CPU_OOM_MARKERS)
