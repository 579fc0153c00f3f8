"""The bad-input corpus, cancellation and out-of-memory through a launched app (gradio_client).

Every corpus file is uploaded to ``/analyze``: good ones must reach the model with the right
pixels (the app's top-5 equals a forward pass on ``viz.images.load_image`` of the same file,
whose pixels tests/test_images.py checks), bad ones must come back as ``AppError`` carrying the
library's readable message, and the server must keep serving afterwards.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.corpus import BAD, CASES, GOOD, LaunchedApp, small_app_config


@pytest.fixture(scope="module")
def la(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("rel_app")
    with LaunchedApp(small_app_config(tmp), tmp) as launched:
        yield launched


@pytest.fixture(scope="module")
def corpus(la: LaunchedApp) -> dict[str, Path]:
    folder = la.tmp / "corpus"
    folder.mkdir(exist_ok=True)
    return {name: case.write(folder) for name, case in CASES.items()}


def _analyze(la: LaunchedApp, path: Path, client=None, **kw):
    from gradio_client import handle_file

    return (client or la.client).predict(handle_file(str(path)), api_name="/analyze", **kw)


def _top5(la: LaunchedApp, out: tuple) -> list[tuple[str, float]]:
    downloads = out[la.module.ANALYZE_OUTPUTS.index("downloads")]
    files = [d if isinstance(d, str) else d.get("path") for d in downloads]
    (report,) = [f for f in files if f.endswith("report.json")]
    (model,) = json.loads(Path(report).read_text())["models"]
    return [(t["label"], float(t["prob"])) for t in model["top5"]]


def _reference_top5(la: LaunchedApp, path: Path) -> list[tuple[str, float]]:
    from viz.images import load_image

    app = la.module
    bb = app.get_backbone(la.cfg, "resnet18", "random", "auto")
    entry = app.get_entry(bb, "random", "conv", app.preset_choices("resnet18")[0])
    x, _ = bb.prepare_input(load_image(path))
    with entry.lock, torch.no_grad():
        p = torch.softmax(entry.model(x).float(), dim=-1)[0]
    vals, idx = p.topk(5)
    return [(bb.categories[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]


def _same(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> bool:
    return [x[0] for x in a] == [x[0] for x in b] and np.allclose([x[1] for x in a], [x[1] for x in b], rtol=1e-4)


def _assert_serving(la: LaunchedApp, corpus: dict[str, Path]) -> None:
    out = _analyze(la, corpus["jpeg_ok"], client=la.new_client())
    assert _same(_top5(la, out), _reference_top5(la, corpus["jpeg_ok"]))


def _no_lock_held(la: LaunchedApp) -> None:
    models = la.module.MODELS
    assert not models._building, f"half-built models left: {list(models._building)}"
    for key in models.keys():  # noqa: SIM118 - LRUCache is not iterable
        assert not models.peek(key).lock.locked(), f"lock held on {key}"


@pytest.mark.parametrize("name", GOOD)
def test_good_corpus_reaches_the_model_with_the_right_pixels(la: LaunchedApp, corpus: dict[str, Path], name: str) -> None:
    out = _analyze(la, corpus[name])
    assert _same(_top5(la, out), _reference_top5(la, corpus[name]))


def test_exif_orientation_is_applied_once(la: LaunchedApp, corpus: dict[str, Path]) -> None:
    """Neither dropped nor applied twice (Gradio's preprocessing also knows EXIF): the app's
    prediction matches the upright image and differs from the stored (unrotated) pixels."""
    from PIL import Image

    stored = la.tmp / "stored.png"
    Image.open(corpus["exif_rotated"]).convert("RGB").save(stored)  # pixels as stored, no EXIF
    got = _top5(la, _analyze(la, corpus["exif_rotated"]))
    assert _same(got, _reference_top5(la, corpus["exif_rotated"]))
    assert not _same(got, _reference_top5(la, stored))


@pytest.mark.parametrize(
    "name",
    BAD,
)
def test_bad_corpus_gives_a_readable_error(
    la: LaunchedApp, corpus: dict[str, Path], name: str
) -> None:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        _analyze(la, corpus[name])
    msg = str(info.value)
    assert re.search(CASES[name].error, msg), msg  # type: ignore[arg-type]
    assert "Traceback" not in msg


def test_every_bad_input_is_refused_and_the_server_survives_them_all(la: LaunchedApp, corpus: dict[str, Path]) -> None:
    """Whatever the message, each bad upload is an error (never a result), and then a good one works."""
    from gradio_client.exceptions import AppError

    for name in BAD:
        with pytest.raises(AppError):
            _analyze(la, corpus[name])
    _assert_serving(la, corpus)
    _no_lock_held(la)


def test_cancelled_request_leaves_no_lock_or_half_built_model(la: LaunchedApp, corpus: dict[str, Path]) -> None:
    """Cancel a request while it runs (a variant model not cached yet, so it is being built); the
    next request with the same models works and gives the same answer as an uncancelled run."""
    variants = [v for v in ("conv", "saconv") if v in la.module.variant_choices()]
    vname = la.param_name("Variants to compare")
    from gradio_client import handle_file

    job = la.client.submit(handle_file(str(corpus["jpeg_ok"])), api_name="/analyze", **{vname: variants})
    deadline = time.monotonic() + 60
    while job.status().code.name not in ("PROCESSING", "PROGRESS", "FINISHED") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # inside the handler: models being prepared
    job.cancel()
    # a queued request behind it is cancelled too, without ever running
    queued = la.client.submit(handle_file(str(corpus["webp"])), api_name="/analyze", **{vname: variants})
    queued.cancel()
    out = _analyze(la, corpus["jpeg_ok"], client=la.new_client(), **{vname: variants})
    again = _analyze(la, corpus["jpeg_ok"], client=la.new_client(), **{vname: variants})
    assert out[0] and again[0]
    downloads = [d if isinstance(d, str) else d.get("path") for d in out[la.module.ANALYZE_OUTPUTS.index("downloads")]]
    report = json.loads(Path(next(f for f in downloads if f.endswith("report.json"))).read_text())
    assert [m["label"] for m in report["models"]] == variants
    d2 = [d if isinstance(d, str) else d.get("path") for d in again[la.module.ANALYZE_OUTPUTS.index("downloads")]]
    report2 = json.loads(Path(next(f for f in d2 if f.endswith("report.json"))).read_text())
    assert [m["top5"] for m in report["models"]] == [m["top5"] for m in report2["models"]]
    _no_lock_held(la)


def _inject_failure(la: LaunchedApp, exc_factory) -> torch.utils.hooks.RemovableHandle:
    """Make the cached baseline model's next forward fail the way a real allocation failure does."""
    app = la.module
    bb = app.get_backbone(la.cfg, "resnet18", "random", "auto")
    entry = app.get_entry(bb, "random", "conv", app.preset_choices("resnet18")[0])

    def hook(module, args):
        raise exc_factory()

    return entry.model.register_forward_pre_hook(hook)


def test_gpu_out_of_memory_becomes_a_clear_message_and_the_next_request_works(
    la: LaunchedApp, corpus: dict[str, Path]
) -> None:
    """torch.OutOfMemoryError (what CUDA raises) inside the model: a readable gr.Error, locks
    released, next request fine. Fault injected with a forward pre-hook (CPU cannot run out of GPU memory)."""
    from gradio_client.exceptions import AppError

    handle = _inject_failure(la, lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    try:
        with pytest.raises(AppError, match="(?i)out of memory"):
            _analyze(la, corpus["jpeg_ok"])
    finally:
        handle.remove()
    _no_lock_held(la)
    _assert_serving(la, corpus)


def test_cpu_allocation_failure_becomes_a_clear_message(la: LaunchedApp, corpus: dict[str, Path]) -> None:
    """A real CPU allocator failure (a 100 TB tensor) raised inside the model forward."""
    from gradio_client.exceptions import AppError

    def real_cpu_oom() -> BaseException:
        try:
            torch.empty(10**14, dtype=torch.uint8)
        except RuntimeError as e:
            return e
        pytest.skip("this machine overcommits memory: a 100 TB allocation did not fail")

    err = real_cpu_oom()
    handle = _inject_failure(la, lambda: err)
    try:
        with pytest.raises(AppError) as info:
            _analyze(la, corpus["jpeg_ok"])
    finally:
        handle.remove()
        _assert_serving(la, corpus)
    assert re.search("(?i)memory", str(info.value)), str(info.value)


def test_large_image_is_refused_from_its_header_through_the_app(la: LaunchedApp) -> None:
    """48 MP (a 47 kB PNG of zeros): below PIL's own bomb error, above our limit. Gradio's
    preprocessing only opens it lazily, so the handler's load_image refuses it before decoding."""
    from gradio_client.exceptions import AppError

    from tests.corpus import png_bytes

    row = bytes(8000)
    path = la.tmp / "big48mp.png"
    path.write_bytes(png_bytes(8000, 6000, bit_depth=8, color_type=0, rows=lambda y: row))
    with pytest.raises(AppError, match=r"big48mp.png: image is 8000×6000 = 48 MP, above the 40 MP limit"):
        _analyze(la, path)
