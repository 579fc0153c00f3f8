"""Backbones: weights sources (torchvision cache, file, bundled, random), offline failure, preprocessing."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from plugconv import list_convs, swap_convs
from plugconv.backbones import (
    DEFAULT_OFFLINE_BACKBONE,
    Backbone,
    BackboneUnavailable,
    WeightsError,
    WeightsInfo,
    bundled_weights_file,
    choose_default_backbone,
    default_backbone_name,
    list_backbones,
    load_backbone,
    resolve_device,
)

RESNET18_FILE = "resnet18-f37072fd.pth"  # what torchvision's ResNet18_Weights.IMAGENET1K_V1 URL ends with


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch cache: nothing cached, and this machine has no route to download.pytorch.org."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return load_backbone("efficientnet_lite0", device="cpu")


def random_resnet18_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet18().state_dict()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_loaded(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k].cpu(), v), k


# ----------------------------------------------------------------------------- names and devices


def test_list_backbones_and_unknown_name() -> None:
    assert list_backbones() == [
        "resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "wide_resnet50_2", "efficientnet_lite0",
    ]
    assert DEFAULT_OFFLINE_BACKBONE == "efficientnet_lite0"
    with pytest.raises(ValueError, match=r"unknown backbone 'vgg16'; choose one of resnet18, .*efficientnet_lite0"):
        load_backbone("vgg16", weights="random")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


# ----------------------------------------------------------------------------- torchvision default weights


@pytest.fixture(params=["refused", "timeout", "hang"])
def no_network(request, monkeypatch):
    """Simulated loss of network, whatever this machine's real connectivity: every TCP connection
    attempt made through ``socket.create_connection`` (the probe's and urllib's) is refused at once,
    times out after the caller's timeout (a blackholed route), or hangs past any timeout (a stuck DNS
    lookup, which ignores socket timeouts). No packet leaves the machine. Yields the hosts tried."""
    import socket
    import threading

    monkeypatch.delenv("PLUGCONV_OFFLINE", raising=False)
    tried: list[str] = []
    release = threading.Event()

    def fake_create_connection(address, timeout=None, *args, **kwargs):
        tried.append(address[0])
        if request.param == "refused":
            raise ConnectionRefusedError(111, "Connection refused (simulated)")
        if request.param == "timeout":
            release.wait(timeout if timeout is not None else 30.0)
            raise TimeoutError("timed out (simulated blackhole)")
        release.wait(60.0)  # "hang": longer than any timeout; released at teardown
        raise OSError("simulated hang released")

    monkeypatch.setattr(socket, "create_connection", fake_create_connection)
    yield tried
    release.set()


def test_offline_default_weights_fail_fast_with_instructions(torch_home, no_network) -> None:
    # nothing cached and no network (simulated): must fail within seconds, not a long network timeout
    t0 = time.perf_counter()
    with pytest.raises(BackboneUnavailable) as info:
        load_backbone("resnet50", device="cpu")
    elapsed = time.perf_counter() - t0
    print(f"offline failure after {elapsed:.2f} s")
    assert elapsed < 10.0
    assert no_network and set(no_network) == {"download.pytorch.org"}  # the probe ran, nothing else
    msg = str(info.value)
    assert "resnet50-11ad3fa6.pth" in msg  # ResNet50_Weights.DEFAULT's file name
    assert str(torch_home / "hub" / "checkpoints") in msg
    assert "--weights" in msg and "efficientnet_lite0" in msg
    assert "download.pytorch.org" in msg


def test_load_backbone_or_fallback(torch_home, monkeypatch) -> None:
    from plugconv.backbones import load_backbone_or_fallback

    monkeypatch.setenv("PLUGCONV_OFFLINE", "1")
    bb, note = load_backbone_or_fallback("resnet50", device="cpu")
    assert bb.name == DEFAULT_OFFLINE_BACKBONE and bb.weights.source == "bundled"
    assert "resnet50" in note and "resnet50-11ad3fa6.pth" in note and DEFAULT_OFFLINE_BACKBONE in note
    with pytest.raises(BackboneUnavailable, match="resnet50-11ad3fa6.pth"):
        load_backbone_or_fallback("resnet50", device="cpu", fallback=False)
    # what is asked for when it is there; explicit files stay strict
    bb, note = load_backbone_or_fallback("resnet18", weights="random", device="cpu")
    assert bb.name == "resnet18" and note is None
    with pytest.raises((WeightsError, FileNotFoundError, ValueError), match="missing.pth"):
        load_backbone_or_fallback("resnet18", weights=str(torch_home / "missing.pth"), device="cpu")


def test_default_weights_from_the_torch_hub_cache(torch_home) -> None:
    sd = random_resnet18_sd(seed=1)
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    path = cache / RESNET18_FILE
    torch.save(sd, path)
    assert torchvision.models.ResNet18_Weights.DEFAULT.url.endswith("/" + RESNET18_FILE)

    b = load_backbone("resnet18", device="cpu")
    assert_loaded(b.model, sd)
    assert not b.model.training
    assert b.weights.source == "torchvision"
    assert b.weights.location == str(path)
    assert b.weights.sha256 == sha(path)
    assert "IMAGENET1K_V1" in b.weights.description
    assert len(b.categories) == 1000 and b.categories[281] == "tabby"
    assert b.to_dict()["weights"] == b.weights.to_dict()
    assert b.to_dict()["weights"]["source"] == "torchvision"

    # with the file cached, the app/CLI start on the resnet; without, on the bundled model
    assert choose_default_backbone("resnet18") == ("resnet18", None)
    assert default_backbone_name("resnet18") == "resnet18"
    name, note = choose_default_backbone("resnet50")
    assert name == "efficientnet_lite0" and "resnet50-11ad3fa6.pth" in note and "bundled" in note


def test_corrupted_cache_file_is_a_weights_error(torch_home) -> None:
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(random_resnet18_sd(), cache / RESNET18_FILE)
    data = (cache / RESNET18_FILE).read_bytes()
    (cache / RESNET18_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match=RESNET18_FILE):
        load_backbone("resnet18", device="cpu")


# ----------------------------------------------------------------------------- files and random


def test_safetensors_and_pth_files(tmp_path) -> None:
    sd = random_resnet18_sd(seed=2)
    st = tmp_path / "r18.safetensors"
    save_file(sd, str(st))
    b = load_backbone("resnet18", weights=str(st), device="cpu")
    assert_loaded(b.model, sd)
    assert b.weights == WeightsInfo("file", str(st), sha(st), b.weights.description)
    assert "r18.safetensors" in b.weights.description

    pth = tmp_path / "r18.pth"
    torch.save({"state_dict": sd, "epoch": 90}, pth)
    b = load_backbone("resnet18", weights=pth, device="cpu")
    assert_loaded(b.model, sd)
    assert b.weights.sha256 == sha(pth)


def test_weights_dir_confines_file_names(tmp_path) -> None:
    wdir = tmp_path / "weights"
    wdir.mkdir()
    sd = random_resnet18_sd(seed=3)
    torch.save(sd, wdir / "mine.pth")
    torch.save(sd, tmp_path / "outside.pth")
    b = load_backbone("resnet18", weights="mine.pth", weights_dir=wdir, device="cpu")
    assert_loaded(b.model, sd)
    with pytest.raises(WeightsError, match=r"may not contain '\.\.'"):
        load_backbone("resnet18", weights="../outside.pth", weights_dir=wdir, device="cpu")
    with pytest.raises(WeightsError, match="outside the weights directory"):
        load_backbone("resnet18", weights=str(tmp_path / "outside.pth"), weights_dir=wdir, device="cpu")
    # an absolute path that really lies inside (the app passes already resolved paths) is fine
    b = load_backbone("resnet18", weights=str((wdir / "mine.pth").resolve()), weights_dir=wdir, device="cpu")
    assert b.weights.location == str((wdir / "mine.pth").resolve())
    (wdir / "link.pth").symlink_to(tmp_path / "outside.pth")
    with pytest.raises(WeightsError, match="outside the weights directory"):
        load_backbone("resnet18", weights=str(wdir / "link.pth"), weights_dir=wdir, device="cpu")


def test_wrong_architecture_file_lists_the_mismatch(tmp_path) -> None:
    p = tmp_path / "r18.pth"
    torch.save(random_resnet18_sd(), p)
    with pytest.raises(WeightsError) as info:
        load_backbone("resnet34", weights=p, device="cpu")
    msg = str(info.value)
    assert "r18.pth" in msg and "missing keys" in msg and "layer1.2.conv1.weight" in msg
    torch.manual_seed(0)
    p10 = tmp_path / "r18_10cls.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), p10)
    with pytest.raises(WeightsError, match=r"fc\.weight: file \(10, 512\) vs model \(1000, 512\)"):
        load_backbone("resnet18", weights=p10, device="cpu")


def test_malicious_weights_file_is_refused(tmp_path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    p = tmp_path / "evil.pth"
    torch.save({"fc.weight": Evil()}, p)
    with pytest.raises(WeightsError, match="refused to load evil.pth"):
        load_backbone("resnet18", weights=p, device="cpu")
    assert not marker.exists()


def test_random_weights_and_timm_names() -> None:
    b = load_backbone("resnet18", weights="random", device="cpu")
    assert b.weights.source == "random" and b.weights.location is None and b.weights.sha256 is None
    t = load_backbone("timm:resnet10t", weights="random", device="cpu")
    assert t.weights.source == "random" and len(t.categories) == 1000
    with pytest.raises(ValueError, match="timm backbones take weights='random' or a weights file"):
        load_backbone("timm:resnet10t", device="cpu")
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        load_backbone("timm:no_such_net", weights="random", device="cpu")


# ----------------------------------------------------------------------------- preprocessing


def test_prepare_input_known_answers(lite0) -> None:
    rb = load_backbone("resnet18", weights="random", device="cpu")
    grey = Image.new("RGB", (300, 200), (128, 64, 255))
    x, crop = rb.prepare_input(grey)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32 and crop.size == (224, 224)
    want = [(v / 255 - m) / s for v, m, s in zip((128, 64, 255), rb.mean, rb.std)]
    torch.testing.assert_close(x[0].mean(dim=(1, 2)), torch.tensor(want), atol=1e-6, rtol=0)
    x5, _ = lite0.prepare_input(grey.convert("L").convert("RGB"))
    assert abs(x5[0, 0, 0, 0].item() - ((grey.convert("L").getpixel((0, 0)) / 255 - 0.5) / 0.5)) < 1e-6

    # shorter side 256 = 224/0.875 already: no resize, centre crop takes columns 188..411 of 600
    arr = np.zeros((256, 600, 3), np.uint8)
    arr[:, :300, 0] = 255  # left half red
    arr[:, 300:, 2] = 255  # right half blue
    _, crop = rb.prepare_input(Image.fromarray(arr))
    c = np.asarray(crop)
    assert (c[:, :112, 0] == 255).all() and (c[:, :112, 2] == 0).all()
    assert (c[:, 112:, 2] == 255).all() and (c[:, 112:, 0] == 0).all()
    # RGBA and greyscale inputs are converted to RGB
    _, crop = rb.prepare_input(Image.new("RGBA", (64, 80)))
    assert crop.mode == "RGB" and crop.size == (224, 224)


# ----------------------------------------------------------------------------- the bundled model


def test_bundled_model_recognises_the_cat(lite0) -> None:
    from skimage import data

    path = bundled_weights_file()
    assert path is not None
    assert lite0.weights.source == "bundled"
    assert lite0.weights.location == str(path)
    assert lite0.weights.sha256 == sha(path)
    assert lite0.input_size == 224 and lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)
    x, _ = lite0.prepare_input(Image.fromarray(data.chelsea()))
    with torch.no_grad():
        p = lite0.model(x).softmax(-1)[0]
    top = int(p.argmax())
    print(f"chelsea: top-1 {top} {lite0.categories[top]!r} p={p[top]:.3f}")
    assert 281 <= top <= 285, (top, lite0.categories[top])  # ImageNet domestic cats
    assert p[281:286].sum() > 0.5


def test_bundled_file_maps_in_order_with_matching_shapes(lite0) -> None:
    from plugconv.weights import load_state_dict_file

    raw = load_state_dict_file(bundled_weights_file())
    ours = lite0.model.state_dict()
    assert len(raw) == len(ours)
    for (rk, rv), (ok, ov) in zip(raw.items(), ours.items()):
        assert rv.shape == ov.shape, (rk, ok)
        assert torch.equal(rv, ov.cpu()), (rk, ok)
    # and the bundled file loads as a user file too (original key layout)
    b = load_backbone("efficientnet_lite0", weights=bundled_weights_file(), device="cpu")
    assert b.weights.source == "file"


@pytest.mark.parametrize("variant", ["saconv", "acb"])
def test_exact_variants_swap_into_efficientnet_lite0(lite0, variant) -> None:
    if variant not in list_convs():
        pytest.skip(f"{variant} is not registered yet")
    r = swap_convs(lite0.model, variant, probe_size=96)  # small inputs keep the test fast
    assert r.exact and r.swapped
    assert all(s.endswith("conv_dw") for s in r.swapped)
    # the stride-2 depthwise convs use TF 'same' padding (timm Conv2dSame): skipped with a reason
    for site, reason in r.skipped:
        assert "Conv2dSame" in reason, (site, reason)
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = lite0.model(x)
        got = r.model(x)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{variant}: {len(r.swapped)} sites swapped, max relative logit difference {rel:.2e}")
    assert rel < 1e-5


@pytest.mark.parametrize("variant", ["scconv", "selfcal", "spconv"])
def test_dense_only_variants_skip_depthwise_sites(lite0, variant) -> None:
    if variant not in list_convs():
        pytest.skip(f"{variant} is not registered yet")
    r = swap_convs(lite0.model, variant, probe_size=96)
    assert r.swapped == ()
    assert len(r.skipped) == 16
    for site, reason in r.skipped:
        assert site.endswith("conv_dw")
        # names the offending value: depthwise groups, the 5x5 kernel, or TF-same padding
        assert re.search(r"groups \d+|kernel_size 5|Conv2dSame", reason), (site, reason)
