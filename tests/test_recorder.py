"""Recorder hygiene: observe-only hooks, scoped removal, in-place refusal, reused modules, no leaks, locks."""

from __future__ import annotations

import gc
import threading
import warnings

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import Bottleneck

from plugconv.backbones import Backbone, WeightsInfo
from viz.models import make_analysis_copy, prepare_model
from viz.recorder import Recorder


def _tiny_backbone(size: int = 64) -> Backbone:
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    return Backbone("resnet18", model, size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                    tuple(f"c{i}" for i in range(10)), WeightsInfo("random", None, None, "test"), torch.device("cpu"))


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               and not m._backward_pre_hooks and not m._forward_hooks_with_kwargs
               and not m._forward_pre_hooks_with_kwargs and not m._forward_hooks_always_called
               for m in model.modules())


_GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                      "_global_backward_pre_hooks", "_global_forward_hooks_with_kwargs",
                      "_global_forward_hooks_always_called", "_global_module_registration_hooks",
                      "_global_parameter_registration_hooks", "_global_buffer_registration_hooks")


def _global_hook_counts() -> dict[str, int]:
    import torch.nn.modules.module as mm

    return {n: len(getattr(mm, n)) for n in _GLOBAL_HOOK_DICTS if hasattr(mm, n)}


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.fixture(scope="module")
def entry():
    return prepare_model(_tiny_backbone(), "conv")


def test_logits_bit_identical_and_hooks_removed(entry):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = entry.model(x)
    with Recorder(entry.model, layers=["layer1", "layer2", "layer3", "layer4"]) as rec:
        logits = entry.model(x)
    assert _no_hooks(entry.model)
    record = rec.finish()
    assert torch.equal(plain, logits.detach())
    assert torch.equal(plain, record.logits)
    assert record.targets == tuple(plain.argmax(1).tolist())
    assert record.score == "logit"
    for layer in ("layer1", "layer4"):
        a, g = record.activation(layer), record.gradient(layer)
        assert g is not None and g.shape == a.shape and not a.requires_grad and a.device.type == "cpu"
    # the parameters got no gradients (frozen analysis copy)
    assert all(p.grad is None and not p.requires_grad for p in entry.model.parameters())


def test_gradients_match_plain_autograd(entry):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 64)
    acts = {}
    h = entry.model.layer3.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    try:
        xi = x.clone().requires_grad_(True)
        out = entry.model(xi)
    finally:
        h.remove()
    (g_ref,) = torch.autograd.grad(out[:, 3].sum(), acts["a"])
    with Recorder(entry.model, layers=["layer3"]) as rec:
        entry.model(x)
    rec_ = rec.finish(target=3)
    torch.testing.assert_close(rec_.gradient("layer3"), g_ref, rtol=1e-5, atol=1e-7)


def test_hooks_removed_on_error(entry):
    class Boom(Exception):
        pass

    def bad(m, i, o):
        raise Boom

    h = entry.model.layer4.register_forward_hook(bad)
    try:
        with pytest.raises(Boom), Recorder(entry.model, layers=["layer2"], taps="*"):
            entry.model(torch.randn(1, 3, 64, 64))
    finally:
        h.remove()
    assert _no_hooks(entry.model)


def test_unknown_layer_message(entry):
    with pytest.raises(KeyError, match="layer9.*top-level modules are"):
        Recorder(entry.model, layers=["layer9"])


def test_inplace_op_after_a_recorded_layer_runs_on_a_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        plain = model(x)
    with Recorder(model, layers=["0"]) as rec:
        logits = model(x)
    r = rec.finish(target=1)
    assert torch.equal(logits.detach(), plain)
    torch.testing.assert_close(r.activation("0"), model[0](x).detach())  # pre-ReLU value, negatives kept
    assert (r.activation("0") < 0).any() and not r.notes
    xi = x.clone().requires_grad_(True)
    a = model[0](xi)
    (g_ref,) = torch.autograd.grad(model[2:](torch.relu(a))[0, 1], a)
    torch.testing.assert_close(r.gradient("0"), g_ref)


class _Aliasing(nn.Module):
    """``ident`` returns its input, which the parent then edits in place: the hook must not hand on
    a copy (that would change the logits), so the recorded tensor itself changes after its hook."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.ident = nn.Identity()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.ident(y)
        y.mul_(2.0)
        return self.head((y + z).mean((2, 3)))


def test_aliased_inplace_modification_refused_or_cloned():
    torch.manual_seed(0)
    model = _Aliasing().eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        plain = model(x)
    with Recorder(model, layers=["ident"]) as rec:
        logits = model(x)
    assert torch.equal(logits.detach(), plain)
    with pytest.raises(RuntimeError, match=r"ident\[0\] was modified in place.*returns its input.*clone=True"):
        rec.finish()
    with Recorder(model, layers=["ident"], clone=True) as rec:
        model(x)
    r = rec.finish()
    torch.testing.assert_close(r.activation("ident"), model.conv(x).detach())  # value at the hook
    assert r.gradient("ident") is None and any("in place" in n for n in r.notes)


def test_reused_module_recorded_per_call():
    torch.manual_seed(0)
    block = make_analysis_copy(Bottleneck(16, 4))  # one relu module, called three times
    x = torch.randn(1, 16, 8, 8)
    with Recorder(block, layers=["relu"], output_fn=lambda o: o.mean((2, 3))) as rec:
        block(x)
    r = rec.finish(target=0)
    assert sorted(r.activations) == [("relu", 0), ("relu", 1), ("relu", 2)]
    with torch.no_grad():
        first = torch.relu(block.bn1(block.conv1(x)))
        second = torch.relu(block.bn2(block.conv2(first)))
    torch.testing.assert_close(r.activation("relu", 0), first)
    torch.testing.assert_close(r.activation("relu", 1), second)
    assert r.activation("relu", 2).shape == (1, 16, 8, 8)


def test_no_accumulation_over_50_passes(entry):
    from PIL import Image

    from viz.analysis import analyze

    bb = _tiny_backbone()
    img = Image.new("RGB", (80, 70), (120, 30, 200))
    analyze([img], bb, [entry], erf=False, redundancy=False, profile=False)  # warm-up
    gc.collect()

    def live() -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    before = live()
    for _ in range(50):
        a = analyze([img], bb, [entry], erf=False, redundancy=False, profile=False)
    del a
    gc.collect()
    assert live() <= before
    assert _no_hooks(entry.model)


def test_no_accumulation_over_50_passes_with_erf_and_taps():
    """saconv (switch / branch taps fire) with the ERF input gradient on the recorded graph."""
    from PIL import Image
    from torchvision.models.resnet import BasicBlock, ResNet

    from viz.analysis import analyze

    torch.manual_seed(0)
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()  # a ResNet-10: half of resnet18's blocks
    bb = Backbone("resnet18", net, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                  tuple(f"c{i}" for i in range(10)), WeightsInfo("random", None, None, "test"), torch.device("cpu"))
    saconv = prepare_model(bb, "saconv")
    assert saconv.swap.swapped
    img = Image.new("RGB", (40, 36), (20, 160, 90))
    globals_before = _global_hook_counts()
    kw = dict(erf=True, erf_layer="layer3", redundancy=False, profile=False)
    a = analyze([img], bb, [saconv], **kw)  # warm-up (lazy init, caches)
    res = a.models[0]
    assert res.erf is not None and res.taps and not res.errors, res.errors
    del a, res
    before = _live_tensors()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a shared machine
    try:
        for _ in range(50):
            a = analyze([img], bb, [saconv], **kw)
    finally:
        torch.set_num_threads(threads)
    assert a.models[0].erf is not None and a.models[0].taps
    del a
    assert _live_tensors() <= before
    assert _no_hooks(saconv.model)
    assert _global_hook_counts() == globals_before


def test_concurrent_analyses_are_isolated(entry):
    from PIL import Image

    from viz.analysis import analyze

    bb = _tiny_backbone()
    imgs = [Image.new("RGB", (64, 64), c) for c in ((250, 10, 10), (10, 10, 250))]
    torch.manual_seed(3)
    noise = [Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()) for _ in range(2)]
    imgs = [Image.blend(a, b, 0.5) for a, b in zip(imgs, noise)]
    seq = [analyze([im], bb, [entry], erf=False, redundancy=False, profile=False) for im in imgs]
    out: list = [None, None]
    errors: list = []

    def run(i: int) -> None:
        try:
            for _ in range(5):
                out[i] = analyze([imgs[i]], bb, [entry], erf=False, redundancy=False, profile=False)
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        a, b = seq[i].models[0], out[i].models[0]
        assert torch.equal(a.record.logits, b.record.logits)
        for layer in a.cams:
            assert torch.equal(a.cams[layer].raw, b.cams[layer].raw)
    assert not torch.equal(seq[0].models[0].record.logits, seq[1].models[0].record.logits)


def test_default_layers_are_stages_plus_swapped_sites():
    from plugconv.surgery import swap_convs

    torch.manual_seed(0)
    res = swap_convs(resnet18(num_classes=10).eval(), "acb", include="layer3.*.conv2", probe_size=64)
    model = make_analysis_copy(res.model)
    with Recorder(model) as rec:
        model(torch.randn(1, 3, 64, 64))
    r = rec.finish()
    assert r.layers == ("layer1", "layer2", "layer3", "layer4", *res.swapped)
    assert r.gradient("layer4") is not None
    # ACB absorbed bn2, so torchvision's `out += identity` follows the site directly: it edits the
    # copy the hook hands on, and the site keeps its value and gets its gradient
    assert not r.notes
    for site in res.swapped:
        g = r.gradient(site)
        assert g is not None and g.shape == r.activation(site).shape and g.abs().sum() > 0


def test_erf_input_gradient_on_the_recorded_graph(entry):
    from viz.erf import contribution, contribution_maps

    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 64)
    xi = x.clone().requires_grad_(True)
    with Recorder(entry.model, layers=["layer2", "layer3"], taps=None) as rec, torch.enable_grad():
        entry.model(xi)
    r = rec.finish(target=[1, 2], erf_layer="layer3", erf_input=xi)
    m_ref, hw = contribution_maps(entry.model, "layer3", x)
    assert r.erf_layer == "layer3" and r.erf_feature_hw == hw == (4, 4) and r.erf_error is None
    assert torch.equal(contribution(r.input_grad), m_ref)
    # the Grad-CAM gradients are unchanged by the extra ERF backward on the same graph
    with Recorder(entry.model, layers=["layer2", "layer3"], taps=None) as rec2, torch.enable_grad():
        entry.model(x)
    r2 = rec2.finish(target=[1, 2])
    assert r2.input_grad is None and r2.erf_layer is None
    for key in r2.gradients:
        assert torch.equal(r.gradients[key], r2.gradients[key])
    with Recorder(entry.model, layers=["layer2"], taps=None) as rec3, torch.enable_grad():
        entry.model(xi)
    with pytest.raises(KeyError, match="ERF layer 'layer4' was not recorded"):
        rec3.finish(erf_layer="layer4", erf_input=xi)
    with Recorder(entry.model, layers=["layer2"], taps=None) as rec4, torch.enable_grad():
        entry.model(x)
    with pytest.raises(ValueError, match="requires_grad=True"):
        rec4.finish(erf_layer="layer2", erf_input=x)
