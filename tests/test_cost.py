"""Cost: parameter counts, dispatcher FLOPs against analytic formulas, latency report structure."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import plugconv
from viz.cost import count_flops, count_params, latency_units, measure_latency, param_deltas, profile_model


def _analytic_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Independent oracle: Σ N·C_out·H_out·W_out·(C_in/g)·k_h·k_w over convs (+ in·out·N for Linear),
    from output shapes recorded with forward hooks."""
    total = 0
    handles = []

    def conv_hook(m, inp, out):
        nonlocal total
        n, c_out, h, w = out.shape
        total += n * c_out * h * w * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def lin_hook(m, inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    for m in model.modules():
        if type(m) is nn.Conv2d:
            handles.append(m.register_forward_hook(conv_hook))
        elif type(m) is nn.Linear:
            handles.append(m.register_forward_hook(lin_hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


@pytest.mark.parametrize(
    "cin,cout,k,stride,dil,groups,bias,hw",
    [(3, 8, 3, 1, 1, 1, False, 9), (8, 16, 5, 2, 1, 4, True, 17), (6, 6, 3, 1, 2, 6, False, 12), (4, 2, 1, 1, 1, 1, True, 5)],
)
def test_plain_conv_flops_equal_formula(cin, cout, k, stride, dil, groups, bias, hw):
    conv = nn.Conv2d(cin, cout, k, stride=stride, dilation=dil, groups=groups, bias=bias, padding=dil * (k // 2))
    x = torch.randn(2, cin, hw, hw)
    h_out = (hw + 2 * dil * (k // 2) - dil * (k - 1) - 1) // stride + 1
    expected = 2 * x.shape[0] * cout * h_out * h_out * (cin // groups) * k * k  # FLOPs = 2 × MACs
    rep = count_flops(conv, x)
    assert rep.total_flops == expected
    assert rep.total_macs == expected / 2
    assert rep.per_module[""]["flops"] == expected and rep.per_module[""]["flops_exclusive"] == expected
    # the bias rides inside aten.convolution: nothing else ran, so the count is complete
    assert rep.complete and rep.status == "complete" and rep.uncounted == {}


def test_saconv_flops_include_both_convs():
    n, ci, co, h = 2, 8, 16, 10
    m = plugconv.create_conv("saconv", ci, co, 3).eval()
    rep = count_flops(m, torch.randn(n, ci, h, h))
    one_conv = 2 * n * co * h * h * ci * 9
    context = 2 * (n * ci * ci + n * co * co + n * 1 * ci * h * h)  # pre/post context on GAP, 1×1 switch
    assert rep.total_flops == 2 * one_conv + context
    assert rep.total_flops > 2 * one_conv  # a module-hook counter would report ≈ one_conv
    assert rep.per_module[""]["flops_exclusive"] == 2 * one_conv  # the two k×k convs run in SAConv itself
    assert not rep.complete and "aten.avg_pool2d" in rep.uncounted[""]


def test_acb_train_and_deploy_forms():
    n, ci, co, h = 1, 4, 8, 6
    m = plugconv.create_conv("acb", ci, co, 3).eval()
    x = torch.randn(n, ci, h, h)
    train = count_flops(m, x)
    assert train.total_flops == 2 * n * co * h * h * ci * (9 + 3 + 3)  # square + 3×1 + 1×3
    deploy = count_flops(plugconv.fuse_model(nn.Sequential(m))[0], x)
    assert deploy.total_flops == 2 * n * co * h * h * ci * 9


def test_exclusive_counts_partition_the_total():
    m = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    rep = count_flops(m, x)
    assert sum(v["flops_exclusive"] for v in rep.per_module.values()) == rep.total_flops
    assert rep.per_module["layer1.0.conv1"]["flops_exclusive"] == rep.per_module["layer1.0.conv1"]["flops"]
    assert rep.per_module["layer1.0"]["flops_exclusive"] == 0
    assert rep.per_module["layer1"]["flops"] == sum(rep.per_module[f"layer1.{i}"]["flops"] for i in range(2))
    assert rep.total_macs == _analytic_macs(m, x)
    assert "aten._native_batch_norm_legit_no_training" in rep.uncounted["bn1"]
    assert rep.status == "conv/matmul only (partial)"
    json.dumps(rep.to_dict())


def test_resnet50_sanity_224():
    """torchvision ResNet-50 at 224²: 25.56 M params, ≈ 4.09 GMACs (analysis.md §4.1)."""
    m = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    params = count_params(m)
    assert params.total == sum(p.numel() for p in m.parameters())
    assert params.total / 1e6 == pytest.approx(25.56, abs=0.005)
    rep = count_flops(m, x)
    assert rep.total_macs == _analytic_macs(m, x)
    assert rep.total_macs / 1e9 == pytest.approx(4.09, abs=0.01)


def test_params_exclusive_inclusive_buffers_and_deltas():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Sequential(nn.Linear(4, 2)))
    rep = count_params(m)
    assert rep.total == 3 * 4 * 9 + 4 + 4 + 4 * 2 + 2
    assert rep.per_module["1"]["params"] == 8 and rep.per_module["1"]["buffers"] == 4 + 4 + 1
    assert rep.per_module[""]["params_exclusive"] == 0 and rep.per_module[""]["params"] == rep.total
    assert rep.per_module["2"]["params"] == 10 and rep.per_module["2"]["params_exclusive"] == 0
    assert {b["name"] for b in rep.buffers} == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert rep.total_buffers == 9
    # SAConv's AWS gamma/beta are buffers, never counted as parameters
    sa = plugconv.create_conv("saconv", 8, 8, 3)
    sp = count_params(sa)
    assert sp.total == sum(p.numel() for p in sa.parameters())
    assert {"weight_gamma", "weight_beta"} <= {b["name"] for b in sp.buffers}
    # deltas of a swapped site against the vanilla model
    host = torchvision.models.resnet18(num_classes=10)
    sw = plugconv.swap_convs(host, "saconv", include="layer1.0.conv2", probe_size=32)
    d = param_deltas(sw.model, host)
    site = sw.model.get_submodule("layer1.0.conv2")
    assert d["per_module"]["layer1.0.conv2"]["delta"] == sum(p.numel() for p in site.parameters()) - 64 * 64 * 9
    assert d["delta"] == d["total"] - d["reference_total"] == d["per_module"][""]["delta"]


def test_latency_units_partition_resnet():
    m = torchvision.models.resnet18(num_classes=10)
    units = latency_units(m)
    assert units[:4] == ["conv1", "bn1", "relu", "maxpool"] and units[-2:] == ["avgpool", "fc"]
    assert "layer1.0" in units and "layer1" not in units
    for u in units:  # no unit nested in another
        assert not any(v != u and v.startswith(u + ".") for v in units)
    covered = {id(p) for u in units for p in m.get_submodule(u).parameters()}
    assert covered == {id(p) for p in m.parameters()}


def test_measure_latency_structure_and_hygiene():
    m = torchvision.models.resnet18(num_classes=10)
    m.train()  # measure_latency runs in eval and restores the flag
    bn = m.bn1.running_mean.clone()
    threads = torch.get_num_threads()
    x = torch.randn(1, 3, 32, 32)
    rep = measure_latency(m, x, warmup=1, repeats=3, per_layer=True, threads=1)
    assert m.training and torch.equal(m.bn1.running_mean, bn)
    assert torch.get_num_threads() == threads
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    assert len(rep.times_ms) == 3 and rep.q1_ms <= rep.median_ms <= rep.q3_ms
    names = [p["name"] for p in rep.per_layer]
    assert sorted(names) == sorted(latency_units(m)) and len(set(names)) == len(names)
    assert all(p["calls"] == 1 for p in rep.per_layer)
    assert rep.per_layer_sum_ms == pytest.approx(sum(p["median_ms"] for p in rep.per_layer))
    lb = rep.labels
    assert lb["threads"] == 1 and lb["batch"] == 1 and lb["input_size"] == "32×32" and lb["dtype"] == "float32"
    assert lb["statistic"] == "median of 3" and lb["torch"] == torch.__version__ and lb["device"]
    assert "hook overhead" in rep.per_layer_note
    assert "median of 3" in rep.label()
    json.dumps(rep.to_dict())
    quick = measure_latency(m, x, warmup=0, repeats=1, per_layer=False)
    assert quick.per_layer == [] and quick.per_layer_sum_ms is None


def test_measure_latency_bad_arguments():
    m = nn.Sequential(nn.Conv2d(3, 3, 1))
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(m, x, repeats=0)
    with pytest.raises(ValueError, match="unknown layers"):
        measure_latency(m, x, layers=["nope"])
    with pytest.raises(ValueError, match="nest"):
        measure_latency(nn.Sequential(nn.Sequential(nn.ReLU())), x, layers=["0", "0.0"])


def test_profile_model_json_and_deploy_form():
    host = torchvision.models.resnet18(num_classes=10).eval()
    sw = plugconv.swap_convs(host, "acb", include="layer1.*.conv*", probe_size=32)
    prof = profile_model(sw.model, 32, repeats=2, warmup=1, threads=1, reference=host)
    json.dumps(prof)
    assert prof["form"] == "train" and prof["deploy"] is not None and prof["deploy"]["form"] == "deploy"
    assert prof["deploy"]["flops"]["total_flops"] == count_flops(host, torch.randn(1, 3, 32, 32)).total_flops
    assert prof["flops"]["total_flops"] > prof["deploy"]["flops"]["total_flops"]
    units = {r["name"]: r for r in prof["units"]}
    assert units["layer1.0"]["flops"] == prof["flops"]["per_module"]["layer1.0"]["flops"]
    assert all(r["latency_ms"] is not None for r in prof["units"])
    assert prof["param_deltas"]["delta"] > 0
    for form in (prof, prof["deploy"]):  # whole-model figure and Σ per-layer side by side
        lat = form["latency"]
        assert lat["median_ms"] > 0 and lat["hooked_total_ms"] > 0
        assert lat["per_layer_sum_ms"] == pytest.approx(sum(p["median_ms"] for p in lat["per_layer"]))
    plain = profile_model(host, 32, latency=False)
    assert plain["deploy"] is None and plain["latency"] is None and plain["form"] is None


def test_deform_conv2d_counted_by_custom_formula():
    """torchvision::deform_conv2d is a custom op (0 FLOPs by default); we count its conv part."""

    class Deform(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 4, 3, 3))

        def forward(self, x):
            offset = torch.zeros(x.shape[0], 18, x.shape[2], x.shape[3])
            return torchvision.ops.deform_conv2d(x, offset, self.weight, padding=1)

    rep = count_flops(Deform(), torch.randn(2, 4, 5, 5))
    assert rep.total_flops == 2 * 2 * 6 * 5 * 5 * 4 * 9
    assert any("deform_conv2d" in n for n in rep.notes)


def test_flop_counting_and_fx_tracing_are_thread_safe():
    """FlopCounterMode tracks modules with process-wide hooks and torch.fx patches
    nn.Module.__call__ process-wide: two threads counting / tracing different models must get
    the sequential results (viz._locks.PROCESS_STATE_LOCK serialises them)."""
    import threading

    from viz._locks import PROCESS_STATE_LOCK, process_state_lock
    from viz.rf import theoretical_rf

    torch.manual_seed(0)
    m1 = torchvision.models.resnet18(num_classes=10).eval()
    m2 = plugconv.swap_convs(torchvision.models.resnet34(num_classes=10).eval(), "saconv",
                             include="layer2.*.conv2", probe_size=32).model.eval()
    x = torch.randn(1, 3, 32, 32)

    def work(m):
        f = count_flops(m, x)
        return f.total_flops, f.per_module, f.uncounted, theoretical_rf(m, "layer4", 32)

    seq = [work(m1), work(m2)]
    got: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(i: int, m) -> None:
        try:
            barrier.wait()
            for _ in range(4):
                got[i].append(work(m))
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate((m1, m2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in (0, 1):
        assert len(got[i]) == 4
        for res in got[i]:
            assert res[0] == seq[i][0]
            assert res[1] == seq[i][1] and res[2] == seq[i][2]
            assert res[3] == seq[i][3]
    # re-entrant, and usable by callers that hold a model lock first
    model_lock = threading.Lock()
    with model_lock, process_state_lock(), PROCESS_STATE_LOCK:
        assert count_flops(m1, x).total_flops == seq[0][0]
