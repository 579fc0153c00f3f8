"""Calibration: layer-wise distillation of non-exact variants, its cache and its CLI.

Small on purpose: a ResNet-18 with seeded random weights, three sites per variant, 64 px crops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from plugconv import swap_convs
from plugconv.calibrate import (
    CalibrationReport,
    apply_calibration,
    calibrate,
    calibrate_cached,
    read_calibration,
    rel_error,
    save_calibration,
)
from plugconv.images_dataset import augmented_crops, images_sha256, load_images

ROOT = Path(__file__).resolve().parent.parent
NON_EXACT = ("scconv", "selfcal", "spconv")
# stride-1, width-keeping 3x3 sites in three stages: every non-exact variant accepts them
SITES = ["layer1.0.conv2", "layer2.1.conv1", "layer3.1.conv2"]
FAST = {"steps": 60, "batch_size": 4, "crop": 64, "samples": 8, "eval_samples": 4, "device": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread avoids OpenMP spin-waiting on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return load_images()


def _swap(teacher: torch.nn.Module, variant: str, seed: int = 1):
    torch.manual_seed(seed)
    return swap_convs(teacher, variant, include=SITES, probe_size=64)


def _site_state(swap, sites=SITES) -> dict[str, torch.Tensor]:
    return {f"{s}.{k}": v.clone() for s in sites for k, v in swap.model.get_submodule(s).state_dict().items()}


def test_example_images_present_with_licences() -> None:
    imgs = load_images()
    assert len(imgs) >= 4
    assert all(im.mode == "RGB" and max(im.size) <= 640 for im in imgs)
    licences = (ROOT / "assets" / "LICENSES.md").read_text()
    for p in sorted((ROOT / "assets").glob("*.jpg")):
        assert p.name in licences, f"{p.name} has no licence entry"


def test_augmented_crops_deterministic_and_normalised(images) -> None:
    a = augmented_crops(images, 6, 32, generator=torch.Generator().manual_seed(3))
    b = augmented_crops(images, 6, 32, generator=torch.Generator().manual_seed(3))
    c = augmented_crops(images, 6, 32, generator=torch.Generator().manual_seed(4))
    assert a.shape == (6, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # an all-white image maps to (1 - mean) / std in every pixel, whatever the crop
    white = [np.full((40, 50, 3), 255, np.uint8)]
    w = augmented_crops(white, 2, 16, generator=torch.Generator().manual_seed(0), mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.testing.assert_close(w, torch.full_like(w, 2.0))


def test_images_sha256_depends_on_pixels_and_order(images) -> None:
    assert images_sha256(images[:2]) == images_sha256([im.copy() for im in images[:2]])
    assert images_sha256(images[:2]) != images_sha256(images[1::-1])


def test_load_images_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        load_images(tmp_path / "nope.jpg", include_examples=False)
    with pytest.raises(ValueError, match="holds no image"):
        load_images(tmp_path, include_examples=False)
    bad = tmp_path / "bad.jpg"
    bad.write_text("<html>not an image</html>")
    with pytest.raises(ValueError, match="bad.jpg"):
        load_images(bad, include_examples=False)


@pytest.mark.parametrize("variant", NON_EXACT)
def test_calibration_reduces_site_error(teacher, images, variant: str) -> None:
    swap = _swap(teacher, variant)
    assert set(swap.swapped) == set(SITES)
    assert set(swap.provenance.values()) == {"initialised"}
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    messages: list[tuple[float, str]] = []
    rep = calibrate(teacher, swap, images, progress=lambda f, m: messages.append((f, m)), **FAST)

    assert [s.site for s in rep.sites] == SITES
    for s in rep.sites:
        # relative error of a fresh module is around 1 (or more); calibration must cut it well down
        assert s.error_before > 0.3, s
        assert s.sq_error_after < 0.5 * s.sq_error_before, s
        # the reported error is the norm ratio; its square is kept alongside
        assert s.error_before == pytest.approx(s.sq_error_before**0.5, rel=1e-12)
        assert s.error_after == pytest.approx(s.sq_error_after**0.5, rel=1e-12)
    # selfcal absorbs the BN that follows each conv: the target must include it
    if variant == "selfcal":
        assert [s.bn for s in rep.sites] == ["layer1.0.bn2", "layer2.1.bn1", "layer3.1.bn2"]
    else:
        assert all(s.bn is None for s in rep.sites)
    # teacher untouched: same state, eval mode, no hooks left behind
    after_teacher = teacher.state_dict()
    assert all(torch.equal(before_teacher[k], after_teacher[k]) for k in before_teacher)
    assert not teacher.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in teacher.modules())
    # student: eval mode, provenance updated in the returned copy only
    assert not swap.model.training
    assert rep.swap is not None and rep.swap.model is swap.model
    assert rep.swap.provenance == dict.fromkeys(SITES, "calibrated")
    assert set(swap.provenance.values()) == {"initialised"}
    assert all(not m._forward_hooks for m in swap.model.modules())
    # progress: fractions in [0, 1], non-decreasing, ends at 1, mentions fitting
    fracs = [f for f, _ in messages]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0 and all(0 <= f <= 1 for f in fracs)
    assert any("fitting" in m for _, m in messages)
    d = rep.to_dict()
    json.dumps(d)
    assert CalibrationReport.from_dict(d) == rep
    assert 0.0 <= rep.agreement_after <= 1.0 and rep.kl_after >= 0.0


def _site_io(model: torch.nn.Module, site: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"x": input, "y": output}`` of ``model``'s module ``site`` in one no-grad forward of ``x``."""
    captured: dict[str, torch.Tensor] = {}
    h = model.get_submodule(site).register_forward_hook(lambda m, i, o: captured.update(x=i[0], y=o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return captured


def test_calibrated_site_matches_teacher_on_fresh_input(teacher, images) -> None:
    """Independent check: run the teacher and student site on a new crop and measure the error directly."""
    swap = _swap(teacher, "scconv")
    rep = calibrate(teacher, swap, images, **FAST)
    site = "layer3.1.conv2"
    x = augmented_crops(images, 2, 64, generator=torch.Generator().manual_seed(99))
    captured = _site_io(teacher, site, x)
    with torch.no_grad():
        s = swap.model.get_submodule(site)(captured["x"])
    err = float((s - captured["y"]).norm() / captured["y"].norm())
    before = next(r.error_before for r in rep.sites if r.site == site)
    assert err < 0.5**0.5 * before


def test_rel_error_is_the_norm_ratio() -> None:
    t = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert rel_error(t * 1.1, t) == pytest.approx(0.1, rel=1e-12)  # not 0.01 (the squared ratio)
    assert rel_error(torch.zeros_like(t), t) == pytest.approx(1.0, rel=1e-12)
    s, t = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])  # ‖s − t‖ = 5, ‖t‖ = 4
    assert rel_error(s, t) == pytest.approx(1.25, rel=1e-7)


def test_reported_site_error_is_norm_ratio_on_held_out_crops(teacher, images) -> None:
    """Known answer: recompute ‖S − T‖ / ‖T‖ over the held-out crops outside ``calibrate``."""
    site = "layer2.1.conv1"
    swap = _swap(teacher, "spconv")
    # the held-out crops of calibrate(seed=0): the stream seeded with seed + 7919
    ev = augmented_crops(images, FAST["eval_samples"], FAST["crop"], generator=torch.Generator().manual_seed(7919))
    captured = _site_io(teacher, site, ev)

    def direct() -> float:
        with torch.no_grad():
            s = swap.model.get_submodule(site)(captured["x"]).double()
        t = captured["y"].double()
        return float((s - t).norm() / t.norm())

    before = direct()
    rep = calibrate(teacher, swap, images, sites=[site], **FAST)
    (r,) = rep.sites
    assert r.error_before == pytest.approx(before, rel=1e-5)
    assert r.error_after == pytest.approx(direct(), rel=1e-5)
    assert r.sq_error_before == pytest.approx(before**2, rel=1e-5)
    assert r.error_after < r.error_before
    assert rep.max_error_after == r.error_after


def test_deterministic_for_fixed_seed(teacher, images) -> None:
    runs = []
    for _ in range(2):
        swap = _swap(teacher, "selfcal", seed=5)
        calibrate(teacher, swap, images, seed=3, **{**FAST, "steps": 5})
        runs.append(_site_state(swap))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    swap = _swap(teacher, "selfcal", seed=5)
    calibrate(teacher, swap, images, seed=4, **{**FAST, "steps": 5})
    other = _site_state(swap)
    assert any(not torch.equal(runs[0][k], other[k]) for k in other)


def test_end_to_end_phase_and_defaults_skip_exact_sites(teacher, images) -> None:
    swap = swap_convs(teacher, "acb", include=SITES, probe_size=64)  # exact transfer
    rep = calibrate(teacher, swap, images, **{**FAST, "steps": 2})
    assert rep.sites == () and rep.swap.provenance == swap.provenance
    assert rep.agreement_before == 1.0 and rep.kl_before < 1e-6

    swap = _swap(teacher, "spconv")
    msgs: list[str] = []
    rep = calibrate(teacher, swap, images, e2e_steps=3, progress=lambda f, m: msgs.append(m), **{**FAST, "steps": 3})
    assert rep.e2e_steps == 3 and any("end-to-end" in m for m in msgs)


def test_bad_arguments(teacher, images) -> None:
    swap = _swap(teacher, "scconv")
    with pytest.raises(ValueError, match="layer9"):
        calibrate(teacher, swap, images, sites=["layer9.conv"], **FAST)
    with pytest.raises(ValueError, match="steps"):
        calibrate(teacher, swap, images, **{**FAST, "steps": -1})
    with pytest.raises(ValueError, match="lr"):
        calibrate(teacher, swap, images, **{**FAST, "lr": float("nan")})
    with pytest.raises(ValueError, match="at least one image"):
        calibrate(teacher, swap, [], **FAST)
    with pytest.raises(ValueError, match="SwapResult"):
        calibrate(teacher, swap.model, images, **FAST)
    with pytest.raises(ValueError, match="unknown calibration options"):
        calibrate_cached("resnet18", None, swap, teacher, images, cache_dir="/nonexistent", stepz=3)


def test_cache_round_trip(teacher, images, tmp_path: Path) -> None:
    weights = {"source": "random", "location": None, "sha256": None, "description": "random"}
    opts = {**FAST, "steps": 40}
    msgs1: list[str] = []
    swap1 = _swap(teacher, "spconv", seed=1)
    rep1 = calibrate_cached("resnet18", weights, swap1, teacher, images, cache_dir=tmp_path,
                            progress=lambda f, m: msgs1.append(m), **opts)
    assert not rep1.from_cache and any("fitting" in m for m in msgs1)
    files = list(tmp_path.glob("*.safetensors"))
    assert [str(f) for f in files] == [rep1.cache_path]
    _, record = read_calibration(files[0])
    assert record["backbone"] == "resnet18" and record["variant"] == "spconv"
    assert record["sites"] == SITES and record["cache_record"]["image_sha256"] == images_sha256(images)
    assert record["report"]["steps"] == 40 and "plugconv_version" in record

    msgs2: list[str] = []
    swap2 = _swap(teacher, "spconv", seed=2)  # different fresh init: loading must overwrite it
    assert any(not torch.equal(a, b) for a, b in zip(_site_state(swap1).values(), _site_state(swap2).values()))
    rep2 = calibrate_cached("resnet18", weights, swap2, teacher, images, cache_dir=tmp_path,
                            progress=lambda f, m: msgs2.append(m), **opts)
    assert rep2.from_cache and rep2.cache_path == rep1.cache_path
    assert not any("fitting" in m for m in msgs2)
    s1, s2 = _site_state(swap1), _site_state(swap2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert rep2.swap.provenance == dict.fromkeys(SITES, "calibrated")
    assert rep2.sites == rep1.sites

    # another option, or other images, is another cache entry
    swap3 = _swap(teacher, "spconv")
    rep3 = calibrate_cached("resnet18", weights, swap3, teacher, images[:2], cache_dir=tmp_path, **opts)
    assert not rep3.from_cache and len(list(tmp_path.glob("*.safetensors"))) == 2

    # a corrupt cache file is ignored with a warning and replaced
    Path(rep1.cache_path).write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="unusable calibration cache"):
        rep4 = calibrate_cached("resnet18", weights, _swap(teacher, "spconv"), teacher, images,
                                cache_dir=tmp_path, **opts)
    assert not rep4.from_cache
    read_calibration(rep4.cache_path)


def test_save_and_apply_checks_fit(teacher, images, tmp_path: Path) -> None:
    swap = _swap(teacher, "scconv")
    rep = calibrate(teacher, swap, images, **{**FAST, "steps": 2})
    path = save_calibration(tmp_path / "c.safetensors", rep, {"backbone": "resnet18"})
    other = swap_convs(teacher, "spconv", include=SITES, probe_size=64)
    with pytest.raises(ValueError, match="spconv"):
        apply_calibration(other, path)
    fresh = _swap(teacher, "scconv", seed=9)
    rep2 = apply_calibration(fresh, path)
    assert rep2.from_cache and rep2.swap.provenance == dict.fromkeys(SITES, "calibrated")
    assert all(torch.equal(a, b) for a, b in zip(_site_state(swap).values(), _site_state(fresh).values()))
    assert [s.error_after for s in rep2.sites] == [s.error_after for s in rep.sites]

    # a format-1 file (error_* held the SQUARED ratio) is read with its errors converted
    from safetensors.torch import save_file

    state, record = read_calibration(path)
    old = json.loads(json.dumps(record))
    old["format"] = "plugconv-calibration/1"
    for s in old["report"]["sites"]:
        s["error_before"], s["error_after"] = s.pop("sq_error_before"), s.pop("sq_error_after")
    v1 = tmp_path / "v1.safetensors"
    save_file(state, str(v1), metadata={"plugconv_calibration": json.dumps(old)})
    rep3 = apply_calibration(_swap(teacher, "scconv", seed=9), v1)
    for a, b in zip(rep3.sites, rep.sites):
        assert a.error_after == pytest.approx(b.error_after, rel=1e-12)
        assert a.sq_error_after == pytest.approx(b.sq_error_after, rel=1e-12)


def test_cli_calibrate(teacher, tmp_path: Path) -> None:
    pytest.importorskip("plugconv.cli")
    weights = tmp_path / "r18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
    out = tmp_path / "cal.safetensors"
    cmd = [sys.executable, "-m", "plugconv", "calibrate", "--backbone", "resnet18", "--weights", str(weights),
           "--variant", "scconv", "--images", str(img_dir), "--out", str(out), "--steps", "2",
           "--crop", "64", "--samples", "4", "--eval-samples", "2", "--device", "cpu",
           "--include", "layer1.0.conv2", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    state, record = read_calibration(out)
    assert record["variant"] == "scconv" and record["sites"] == ["layer1.0.conv2"]
    assert record["backbone"] == "resnet18" and record["weights"]["source"] == "file"
    assert printed["report"]["steps"] == 2 and printed["out"] == str(out)
    # per-site provenance: calibrated, or initialised where the guard kept the initial parameters
    prov = printed["provenance"]
    assert prov["backbone_weights"]["source"] == "file" and prov["backbone_weights"]["location"] == str(weights)
    (site_rep,) = printed["report"]["sites"]
    assert prov["sites"] == {"layer1.0.conv2": "calibrated" if site_rep["calibrated"] else "initialised"}
    assert printed["fallback"] is None
    assert state and all(k.startswith("layer1.0.conv2.") for k in state)
    # the file applies to a fresh swap of the same network
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(weights))
    applied = apply_calibration(swap_convs(model.eval(), "scconv", include="layer1.0.conv2", probe_size=64), out)
    assert applied.swap.provenance == {"layer1.0.conv2": "calibrated"}

    bad = subprocess.run([*cmd[:9], "nonsense", *cmd[10:]], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env=env)
    assert bad.returncode != 0 and "nonsense" in bad.stderr


def test_cli_calibrate_offline_default_falls_back_with_provenance(tmp_path: Path) -> None:
    """--weights default with no cache and no network: the bundled model, said on stderr and in the JSON."""
    out = tmp_path / "cal.safetensors"
    cmd = [sys.executable, "-m", "plugconv", "calibrate", "--backbone", "resnet18", "--weights", "default",
           "--variant", "acb", "--no-examples", "--images", str(ROOT / "assets" / "chelsea.jpg"),
           "--out", str(out), "--steps", "1", "--crop", "32", "--samples", "2", "--eval-samples", "2",
           "--batch-size", "2", "--device", "cpu", "--quiet", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PLUGCONV_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "th")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["backbone"] == "efficientnet_lite0" and printed["requested_backbone"] == "resnet18"
    assert "resnet18" in printed["fallback"] and "efficientnet_lite0" in printed["fallback"]
    assert f"plugconv calibrate: note: {printed['fallback']}" in proc.stderr
    prov = printed["provenance"]
    assert prov["backbone_weights"]["source"] == "bundled"
    assert prov["sites"] and set(prov["sites"].values()) == {"exact"}  # acb transfers exactly: nothing to fit
    _, record = read_calibration(out)
    assert record["fallback"] == printed["fallback"] and record["sites"] == []

    # a variant the bundled model cannot host is an error that names the fallback
    bad = subprocess.run([*cmd[:9], "scconv", *cmd[10:]], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env=env)
    assert bad.returncode == 2 and "fallback model efficientnet_lite0" in bad.stderr
    # --no-fallback: the guiding error instead
    strict = subprocess.run([*cmd, "--no-fallback"], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert strict.returncode == 2 and "resnet18-f37072fd.pth" in strict.stderr and "Traceback" not in strict.stderr


def test_too_short_fit_keeps_initial_parameters(teacher, images) -> None:
    """One step from freshly estimated BN statistics is worse than the fresh module: nothing is kept."""
    swap = _swap(teacher, "selfcal")
    init = _site_state(swap)
    rep = calibrate(teacher, swap, images, **{**FAST, "steps": 1})
    kept = [s for s in rep.sites if not s.calibrated]
    assert kept, "expected at least one site to be worse after a single step"
    for s in kept:
        assert rep.swap.provenance[s.site] == "initialised"
        assert s.error_after == pytest.approx(s.error_before, rel=1e-6)
        state = {k: v for k, v in _site_state(swap, [s.site]).items()}
        assert all(torch.equal(state[k], init[k]) for k in state)
    for s in rep.sites:
        assert rep.swap.provenance[s.site] == ("calibrated" if s.calibrated else "initialised")
