"""One process-wide lock for analysis steps that change process-wide state.

Two steps of the engine patch or hook *every* module in the process, not just the model they
analyse:

- ``torch.utils.flop_counter.FlopCounterMode`` tracks modules with
  ``torch.utils.module_tracker.ModuleTracker``, i.e. global forward (pre-)hooks
  (``register_module_forward_pre_hook`` / ``register_module_forward_hook``): while it counts,
  every module call in every thread updates its parent stack;
- ``torch.fx`` symbolic tracing (the theoretical receptive field, :mod:`viz.rf`) patches
  ``nn.Module.__call__`` (and some functions) process-wide for the duration of the trace.

Two such steps on different models in two threads would see each other's module calls. Both are
therefore run under :data:`PROCESS_STATE_LOCK` (:func:`viz.cost.count_flops`,
:func:`viz.rf.theoretical_rf`). Other code that runs a forward which must not overlap with them
(e.g. a recorded pass in a server thread) can hold it too.

Lock order, to stay free of deadlocks with per-model locks (``ModelEntry.lock``): a model lock may
be held while acquiring this lock; never wait on a model lock while holding this one. The lock is
re-entrant, so nested use in one thread is fine.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: re-entrant; take it *inside* any per-model lock, never the other way round
PROCESS_STATE_LOCK = threading.RLock()


@contextmanager
def process_state_lock() -> Iterator[None]:
    """``with process_state_lock(): ...``: hold :data:`PROCESS_STATE_LOCK` for the block."""
    with PROCESS_STATE_LOCK:
        yield
