"""Out of memory: the gr.Error the user gets keeps no frame of the failed pass alive, and CUDA's
cache is emptied only after those tensors are gone."""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import gradio as gr
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402


def _failing_pass(refs: list) -> None:
    activations = torch.ones(1000, 1000)  # stands in for the activations of a failed forward
    refs.append(weakref.ref(activations))
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.mark.parametrize("exc_kind", ["cuda", "cpu"])
def test_oom_error_frees_the_failed_pass_before_emptying_the_cache(monkeypatch, exc_kind) -> None:
    refs: list = []
    alive_at_empty_cache: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: alive_at_empty_cache.append(refs[0]() is not None))

    def run() -> None:
        if exc_kind == "cuda":
            _failing_pass(refs)
        else:
            try:
                _failing_pass(refs)
            except torch.OutOfMemoryError:  # a CPU allocator failure is a plain RuntimeError
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB") from None

    with pytest.raises(gr.Error, match="(?i)out of memory") as info, app._UserErrors():
        run()
    err = info.value
    assert alive_at_empty_cache == [False], "empty_cache ran while the failed pass's tensors were still referenced"
    assert refs[0]() is None
    assert err.__cause__ is None and err.__suppress_context__


def test_user_errors_are_still_readable() -> None:
    with pytest.raises(gr.Error, match="bad thing"), app._UserErrors():
        raise ValueError("bad thing")
