"""Untrusted weight files (plugconv.weights): safe loading, readable errors, directory confinement."""

from __future__ import annotations

import os
import pickle
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from plugconv.weights import (
    WeightsError,
    confine_weights_path,
    list_weights_files,
    load_state_dict_checked,
    load_state_dict_file,
    resolve_weights_file,
    sha256_file,
    state_dict_mismatch,
)


def small_net(out: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(out))


def tiny_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)  # safetensors stores keys in its own order
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for ``os.system`` that leaves evidence."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _SystemPayload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- reading


def test_safetensors_roundtrip(tmp_path) -> None:
    sd = tiny_sd()
    p = tmp_path / "w.safetensors"
    save_file(sd, str(p))
    assert_same(load_state_dict_file(p), sd)


def test_pth_plain_and_containers_are_unwrapped(tmp_path) -> None:
    sd = tiny_sd()
    torch.save(sd, tmp_path / "plain.pth")
    torch.save({"state_dict": sd, "epoch": 7, "arch": "x"}, tmp_path / "ckpt.pt")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}}, tmp_path / "ddp.pth")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("plain.pth", "ckpt.pt", "ddp.pth", "legacy.pth"):
        assert_same(load_state_dict_file(tmp_path / name), sd)


@pytest.mark.parametrize("payload", [_Payload, _SystemPayload])
@pytest.mark.parametrize("fmt, proto", [("zip", 2), ("raw-pickle", 2), ("raw-pickle", 4)])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, fmt, proto) -> None:
    marker = tmp_path / "pwned"
    evil = {"conv.weight": torch.zeros(2), "x": payload(str(marker))}
    p = tmp_path / "evil.pth"
    if fmt == "zip":
        torch.save(evil, p)
    else:
        p.write_bytes(pickle.dumps(payload(str(marker)), protocol=proto))
    # sanity: the payload is real (plain pickle would run it)
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(payload(str(probe))))
    if payload is _SystemPayload and sys.platform.startswith("win"):  # pragma: no cover
        pytest.skip("touch not available")
    assert probe.exists(), "the payload does not run under plain pickle; the test would prove nothing"

    with pytest.raises(WeightsError, match=r"refused to load evil\.pth: .*run Python code") as info:
        load_state_dict_file(p)
    assert ("system" if payload is _SystemPayload else "open") in str(info.value)  # names the import
    assert not marker.exists()


def test_truncated_files_name_the_file_and_the_problem(tmp_path) -> None:
    sd = tiny_sd()
    pth = tmp_path / "cut.pth"
    torch.save(sd, pth)
    data = pth.read_bytes()
    pth.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cut\.pth: the file is truncated or corrupted"):
        load_state_dict_file(pth)

    st = tmp_path / "cut.safetensors"
    save_file(sd, str(st))
    data = st.read_bytes()
    st.write_bytes(data[: len(data) - 20])
    with pytest.raises(WeightsError, match=r"cut\.safetensors: the safetensors file is truncated or corrupted"):
        load_state_dict_file(st)

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"<html>not weights</html>")
    with pytest.raises(WeightsError, match=r"cannot read junk\.pth: not a PyTorch weights file"):
        load_state_dict_file(junk)


def test_missing_file_bad_suffix_and_non_state_dict(tmp_path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        load_state_dict_file(tmp_path / "nope.pth")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(WeightsError, match=r"suffix '\.txt'.*\.safetensors"):
        load_state_dict_file(tmp_path / "w.txt")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="holds a list, not a state dict"):
        load_state_dict_file(tmp_path / "list.pth")
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(WeightsError, match="no tensors found"):
        load_state_dict_file(tmp_path / "meta.pth")


def test_wrong_architecture_gives_readable_lists() -> None:
    torch.manual_seed(0)
    src = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 10))
    dst = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1))
    sd = src.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["1.running_mean"]
    text = state_dict_mismatch(dst, sd)
    assert text is not None
    assert "missing keys (1): 1.running_mean" in text
    assert "unexpected keys (1): extra.weight" in text
    assert "0.weight: file (8, 3, 3, 3) vs model (16, 3, 3, 3)" in text
    assert "2.weight: file (10, 8) vs model (4, 16, 1, 1)" in text
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(WeightsError, match="do not fit Sequential"):
        load_state_dict_checked(dst, sd, what="weights in x.pth")
    assert_same(dst.state_dict(), before)  # nothing half-loaded
    assert state_dict_mismatch(src, src.state_dict()) is None


def test_long_lists_are_truncated() -> None:
    dst = nn.Sequential(*[nn.Linear(2, 2) for _ in range(30)])
    text = state_dict_mismatch(dst, {})
    assert text is not None and "missing keys (60)" in text and "and 48 more" in text


def test_sha256_known_answer(tmp_path) -> None:
    p = tmp_path / "abc.bin"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ----------------------------------------------------------------------------- the weights directory


@pytest.fixture
def wdir(tmp_path):
    d = tmp_path / "weights"
    (d / "sub").mkdir(parents=True)
    torch.save(tiny_sd(), d / "a.pth")
    save_file(tiny_sd(), str(d / "sub" / "b.safetensors"))
    (d / "notes.txt").write_text("not weights")
    outside = tmp_path / "secret.pth"
    torch.save(tiny_sd(), outside)
    os.symlink(outside, d / "escape.pth")
    os.symlink(d / "a.pth", d / "alias.pth")
    os.symlink(tmp_path, d / "up")
    return d


def test_resolve_accepts_names_inside(wdir) -> None:
    assert resolve_weights_file("a.pth", wdir) == (wdir / "a.pth").resolve()
    assert resolve_weights_file("sub/b.safetensors", wdir) == (wdir / "sub" / "b.safetensors").resolve()
    assert resolve_weights_file("alias.pth", wdir) == (wdir / "a.pth").resolve()


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("../secret.pth", r"may not contain '\.\.'"),
        ("sub/../../secret.pth", r"may not contain '\.\.'"),
        ("ABS", "not an absolute path"),
        ("escape.pth", "points outside the weights directory"),
        ("up/secret.pth", "points outside the weights directory"),
        ("missing.pth", r"not found in the weights directory; available: a\.pth, alias\.pth, sub/b\.safetensors"),
        ("notes.txt", r"suffix '\.txt'"),
        ("", "invalid weights file name"),
    ],
)
def test_resolve_refuses_escapes(wdir, name, pattern) -> None:
    if name == "ABS":
        name = str((wdir / "a.pth").resolve())
    with pytest.raises(WeightsError, match=pattern):
        resolve_weights_file(name, wdir)


def test_list_weights_files_only_lists_files_inside(wdir, tmp_path) -> None:
    assert list_weights_files(wdir) == ["a.pth", "alias.pth", "sub/b.safetensors"]
    assert list_weights_files(tmp_path / "nowhere") == []
    assert list_weights_files(None) == []


def test_confine_weights_path(wdir, tmp_path) -> None:
    assert confine_weights_path("a.pth", wdir) == (wdir / "a.pth").resolve()
    assert confine_weights_path(str((wdir / "sub" / "b.safetensors").resolve()), wdir) == (
        wdir / "sub" / "b.safetensors"
    ).resolve()
    with pytest.raises(WeightsError, match="outside the weights directory"):
        confine_weights_path(str(tmp_path / "secret.pth"), wdir)
    with pytest.raises(WeightsError, match="outside the weights directory"):
        confine_weights_path(str(wdir / "escape.pth"), wdir)  # absolute, but a symlink out
    with pytest.raises(WeightsError, match=r"may not contain '\.\.'"):
        confine_weights_path("../secret.pth", wdir)
    assert confine_weights_path(str(tmp_path / "secret.pth"), None) == tmp_path / "secret.pth"
