"""analyze(): one forward + one backward per model, report structure, cost cache, presets, no mutation."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torchvision.models import resnet18

from plugconv.backbones import Backbone, WeightsInfo
from viz.analysis import analyze
from viz.models import DEFAULT_PRESET, prepare_model, site_presets


def _tiny_backbone(size: int = 64) -> Backbone:
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    return Backbone("resnet18", model, size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                    tuple(f"c{i}" for i in range(10)), WeightsInfo("random", None, None, "test"), torch.device("cpu"))


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(72, 80, 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def bb():
    return _tiny_backbone()


@pytest.fixture(scope="module")
def entries(bb):
    return [prepare_model(bb, v) for v in ("conv", "saconv", "scconv")]


def test_one_forward_and_one_backward_per_model(bb, entries, monkeypatch):
    forwards = {e.label: 0 for e in entries}
    handles = []
    for e in entries:
        def hook(m, i, o, label=e.label):
            forwards[label] += 1
        handles.append(e.model.register_forward_hook(hook))
    grads = []
    real = torch.autograd.grad

    def counting(outputs, inputs, *a, **k):
        grads.append(len(inputs) if isinstance(inputs, (list, tuple)) else 1)
        return real(outputs, inputs, *a, **k)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    try:
        a = analyze([_image(0), _image(1)], bb, entries, erf=False, profile=False)
    finally:
        for h in handles:
            h.remove()
    assert forwards == {e.label: 1 for e in entries}
    assert grads == [4, 4, 4]  # one call per model, gradients for all four stage outputs at once
    for m in a.models:
        assert set(m.cams) == {"layer1", "layer2", "layer3", "layer4"}
        assert m.cams["layer4"].raw.shape == (2, 2, 2) and m.cams["layer1"].raw.shape == (2, 16, 16)


def test_report_dict_structure_and_shared_target(bb, entries):
    a = analyze([_image(2)], bb, entries, erf=True, profile=True, latency=False, topk=3)
    d = json.loads(json.dumps(a.to_dict(), allow_nan=False))
    for key in ("backbone", "weights", "device", "input_size", "models", "target", "cka", "layers"):
        assert key in d
    assert d["weights"]["source"] == "random" and d["input_size"] == 64 and d["device"] == "cpu"
    assert set(d["cka"]) == {"layer1", "layer2", "layer3", "layer4"}
    for m, e in zip(d["models"], entries):
        for key in ("variant", "swapped", "skipped", "provenance", "top5", "params", "flops", "latency_ms",
                    "layers", "gradcam", "taps", "erf", "timings"):
            assert key in m, key
        assert m["swapped"] == list(e.swap.swapped)
        probs = [t["prob"] for t in m["top5"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-9
        assert m["params"] == sum(p.numel() for p in e.model.parameters())
        assert m["flops"] > 0
        assert [layer["name"] for layer in m["layers"]] == ["layer1", "layer2", "layer3", "layer4"]
        assert m["layers"][0]["redundancy"]["C"] == 64 and "similarity" not in m["layers"][0]["redundancy"]
        assert {"record", "backward", "erf", "profile"} <= set(m["timings"])
        assert set(m["erf"]["area_ratios"]) == {"0.2", "0.3", "0.5", "0.99"}
        assert m["errors"] == {}, m["errors"]
    # every model explains the same class: the first model's top-1
    assert d["target"]["classes"] == [int(a.models[0].record.logits.argmax())]
    assert all(m.record.targets == a.models[0].record.targets for m in a.models)
    assert d["models"][1]["taps"] and all(t["kind"] for t in d["models"][1]["taps"])


def test_profile_is_cached_per_model(bb, entries, monkeypatch):
    import viz.cost

    calls = []
    real = viz.cost.profile_model

    def counting(model, *a, **k):
        calls.append(model)
        return real(model, *a, **k)

    monkeypatch.setattr(viz.cost, "profile_model", counting)
    e = prepare_model(bb, "conv")
    for seed in (3, 4):
        analyze([_image(seed)], bb, [e], erf=False, redundancy=False, profile=True, latency=False)
    assert len(calls) == 1


def test_presets_and_no_mutation(bb):
    presets = site_presets("resnet18")
    assert list(presets)[0] == DEFAULT_PRESET and {"last stage only", "first stage only"} <= set(presets)
    relu_flags = [m.inplace for m in bb.model.modules() if isinstance(m, torch.nn.ReLU)]
    grads = [p.requires_grad for p in bb.model.parameters()]
    e = prepare_model(bb, "saconv", preset="last stage only")
    assert e.swap.swapped and all(s.startswith("layer4.") for s in e.swap.swapped)
    first = prepare_model(bb, "saconv", preset="first stage only")
    assert first.swap.swapped and all(s.startswith("layer1.") for s in first.swap.swapped)
    assert [m.inplace for m in bb.model.modules() if isinstance(m, torch.nn.ReLU)] == relu_flags
    assert [p.requires_grad for p in bb.model.parameters()] == grads
    assert not any(getattr(m, "inplace", False) for m in e.model.modules())
    assert not any(p.requires_grad for p in e.model.parameters()) and not e.model.training
    with pytest.raises(KeyError, match="unknown site preset 'nope'.*choose one of"):
        prepare_model(bb, "saconv", preset="nope")
    eff = site_presets("efficientnet_lite0")
    assert eff["last stage only"]["exclude"] == [f"blocks.{i}.*" for i in range(6)]


def test_erf_from_the_recorded_graph_one_forward_per_model(bb, entries, monkeypatch):
    """With the ERF: still one forward per model (pre-hooks also count truncated forwards) and two
    ``autograd.grad`` calls on that one graph: the ERF seed -> input, then the score -> 4 stages."""
    import numpy as np

    forwards = {e.label: 0 for e in entries}
    handles = []
    for e in entries:
        def pre(m, i, label=e.label):
            forwards[label] += 1
        handles.append(e.model.register_forward_pre_hook(pre))
    grads = []
    real = torch.autograd.grad

    def counting(outputs, inputs, *a, **k):
        grads.append((len(inputs) if isinstance(inputs, (list, tuple)) else 1, bool(k.get("retain_graph"))))
        return real(outputs, inputs, *a, **k)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    images = [_image(5), _image(6)]
    try:
        a = analyze(images, bb, entries, erf=True, redundancy=False, profile=False)
    finally:
        monkeypatch.undo()
        for h in handles:
            h.remove()
    assert forwards == {e.label: 1 for e in entries}
    assert grads == [(1, True), (4, False)] * len(entries)
    # independent oracles: the ERF's own truncated pass, Grad-CAM without the ERF, a plain forward
    from viz.analysis import prepare_inputs
    from viz.erf import effective_receptive_field

    x, _ = prepare_inputs(images, bb)
    plain = analyze(images, bb, entries, erf=False, redundancy=False, profile=False)
    for m, p, e in zip(a.models, plain.models, entries):
        ref = effective_receptive_field(e.model, "layer4", x)
        assert m.errors == {}, m.errors
        assert np.array_equal(m.erf.mean_map, ref.mean_map) and m.erf.mean_map.max() > 0
        assert m.erf.ratios == ref.ratios and m.erf.feature_hw == ref.feature_hw == (2, 2)
        with torch.no_grad():
            assert torch.equal(m.record.logits, e.model(x))
        assert torch.equal(m.record.logits, p.record.logits)
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            assert torch.equal(m.cams[layer].raw, p.cams[layer].raw)


def test_image_independent_work_is_cached_per_model(bb, monkeypatch):
    """theoretical_rf runs once per model and input size; the ACB fusion check once per model and
    image (a new image is checked afresh), with identical numbers on a repeat."""
    import viz.rf
    import viz.taps

    rf_calls, fuse_calls = [], []
    real_rf, real_fuse = viz.rf.theoretical_rf, viz.taps.acb_fuse_difference

    def rf(model, *a, **k):
        rf_calls.append(model)
        return real_rf(model, *a, **k)

    def fuse(logits, fused, x):
        fuse_calls.append(fused)
        return real_fuse(logits, fused, x)

    monkeypatch.setattr(viz.rf, "theoretical_rf", rf)
    monkeypatch.setattr("viz.analysis.acb_fuse_difference", fuse)
    e = prepare_model(bb, "acb")
    runs = [analyze([_image(s)], bb, [e], redundancy=False, profile=False) for s in (7, 7, 8)]
    assert len(rf_calls) == 1 and len(fuse_calls) == 2
    first, again, other = (r.models[0] for r in runs)
    assert first.extra["fuse_max_abs_diff"] == again.extra["fuse_max_abs_diff"] < 1e-3
    assert first.theoretical_rf == again.theoretical_rf == other.theoretical_rf
    first.theoretical_rf["r"] = -1  # a copy: the cache is not affected
    assert analyze([_image(7)], bb, [e], redundancy=False, profile=False).models[0].theoretical_rf["r"] > 0


def test_optional_phase_errors_are_reported_but_out_of_memory_propagates(bb, entries, monkeypatch):
    """A failing optional phase (redundancy) is reported per model and the rest still runs; an
    out-of-memory error in it is not swallowed (the app frees memory and tells the user)."""
    import viz.redundancy as vr

    def broken(*a, **k):
        raise ValueError("broken metric")

    monkeypatch.setattr(vr, "redundancy_metrics", broken)
    a = analyze([_image(0)], bb, entries[:2], erf=False, profile=False)
    assert all(m.errors.get("redundancy") == "ValueError: broken metric" for m in a.models)
    assert all(m.cams for m in a.models)
    d = a.to_dict()
    assert d["models"][0]["errors"]["redundancy"] == "ValueError: broken metric"
    assert {"record", "backward", "maps", "redundancy"} <= set(d["models"][0]["timings"])
    assert "cka" in d["timings"]

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(vr, "redundancy_metrics", oom)
    with pytest.raises(torch.OutOfMemoryError):
        analyze([_image(0)], bb, entries[:1], erf=False, profile=False)

    def cpu_oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(vr, "redundancy_metrics", cpu_oom)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        analyze([_image(0)], bb, entries[:1], erf=False, profile=False)


def test_report_has_the_per_layer_latency_sum(bb, entries):
    from viz.analysis import cached_profile

    a = analyze([_image(0)], bb, entries[:1], erf=False, redundancy=False, profile=True, latency=True)
    m = a.to_dict()["models"][0]
    lat = cached_profile(entries[0].model, 64, latency=True)["latency"]
    assert m["latency_ms"] and m["latency_ms"] > 0
    assert m["latency_per_layer_sum_ms"] == lat["per_layer_sum_ms"] and m["latency_per_layer_sum_ms"] > 0
    assert m["latency_hooked_total_ms"] == lat["hooked_total_ms"]
    assert sum(r["latency_ms"] for r in m["layers"]) <= m["latency_per_layer_sum_ms"] + 1e-9


def test_layer_redundancy_equals_the_sequential_loop():
    """Two layers at a time in worker threads: the same numbers as one after the other."""
    import numpy as np

    from viz.analysis import layer_redundancy
    from viz.redundancy import redundancy_metrics

    g = torch.Generator().manual_seed(2)
    acts = {f"l{i}": torch.relu(torch.randn(1, c, s, s, generator=g)) for i, (c, s) in
            enumerate(((16, 12), (32, 6), (96, 3), (8, 2)))}
    par = layer_redundancy(acts)
    assert list(par) == list(acts)
    for k, a in acts.items():
        seq = redundancy_metrics(a, pair_dtype=torch.float32)
        for key in ("mean_abs_cos", "erank", "dead_fraction", "near_duplicate_fraction"):
            assert par[k][key] == seq[key], (k, key)
        np.testing.assert_array_equal(par[k]["similarity"]["matrix"], seq["similarity"]["matrix"])
