"""Known-answer tests for viz.redundancy (analysis.md §3.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from viz.redundancy import cka_matrix, linear_cka, redundancy_metrics, similarity_matrix, summary


def _orthogonal_channels(c: int, n: int = 2, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    """N×C×H×W whose centred channels are exactly orthogonal with equal variance."""
    g = torch.Generator().manual_seed(seed)
    m = n * h * w
    q, _ = torch.linalg.qr(torch.randn(m, c, generator=g, dtype=torch.float64))
    q = q - q.mean(dim=0, keepdim=True)  # centre, then re-orthonormalise in the centred subspace
    q, _ = torch.linalg.qr(q)
    q = q - q.mean(dim=0, keepdim=True)
    f = (q / q.norm(dim=0, keepdim=True)).T * 3.0 + 5.0  # C×M, offsets do not matter for centred metrics
    return f.reshape(c, n, h, w).transpose(0, 1).contiguous()


def test_identical_channels():
    torch.manual_seed(0)
    base = torch.randn(2, 1, 6, 6)
    acts = base.repeat(1, 16, 1, 1) * torch.linspace(0.5, 2.0, 16).view(1, 16, 1, 1)  # scaled copies
    r = redundancy_metrics(acts)
    assert r["mean_abs_cos"] == pytest.approx(1.0, abs=1e-9)
    assert r["mean_abs_cos_plain"] == pytest.approx(1.0, abs=1e-9)
    assert r["near_duplicate_fraction"] == 1.0
    assert r["share_pairs_above_tau"] == 1.0
    assert r["distinct_channels"] == 1
    assert r["erank"] == pytest.approx(1.0, abs=1e-4)
    assert r["participation_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert r["k90"] == 1
    assert r["C_kept"] == 16 and r["dead_fraction"] == 0.0


@pytest.mark.parametrize("c", [8, 10, 31])
def test_orthogonal_equal_variance(c):
    acts = _orthogonal_channels(c)
    r = redundancy_metrics(acts)
    assert r["mean_abs_cos_centred"] == pytest.approx(0.0, abs=1e-9)
    assert r["near_duplicate_fraction"] == 0.0
    assert r["distinct_channels"] == c
    assert r["erank"] == pytest.approx(c, rel=1e-9)
    assert r["participation_ratio"] == pytest.approx(c, rel=1e-9)
    assert r["k90"] == math.ceil(0.9 * c)
    assert r["k95"] == math.ceil(0.95 * c)
    assert r["erank_ratio"] == pytest.approx(1.0)
    # the plain cosine sees the common offset (+5) and is biased high
    assert r["mean_abs_cos_plain"] > 0.5


def test_orthogonal_via_small_gram_when_m_below_c():
    """M < C′ takes the M×M Gram route; the spectrum must still be right (rank ≤ M − 1)."""
    torch.manual_seed(1)
    k, c = 5, 64
    n, h, w = 1, 4, 4  # M = 16 < C
    basis = torch.randn(k, n * h * w, dtype=torch.float64)
    mix = torch.randn(c, k, dtype=torch.float64)
    f = mix @ basis
    acts = f.reshape(c, n, h, w).transpose(0, 1)
    r = redundancy_metrics(acts)
    f_c = f - f.mean(dim=1, keepdim=True)
    sv = torch.linalg.svdvals(f_c).numpy()
    sv = sv[sv > sv[0] * 1e-6]
    p = sv / sv.sum()
    assert r["erank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-8)
    lam = sv**2
    assert r["participation_ratio"] == pytest.approx(float(lam.sum() ** 2 / (lam**2).sum()), rel=1e-8)
    assert r["rank_cap"] == 15
    assert r["warning"] and "10·C'" in r["warning"]


@pytest.mark.parametrize("k", [1, 3, 7])
def test_rank_k_construction(k):
    """C channels that are mixes of k equal-variance orthogonal sources: k90 ≤ k, erank ≤ k."""
    src = _orthogonal_channels(k, n=4, h=8, w=8, seed=k).transpose(0, 1).reshape(k, -1)
    g = torch.Generator().manual_seed(k)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    mix = q[:, :k]  # orthonormal columns: the k sources keep equal variance in the mixture
    f = mix @ (src - src.mean(dim=1, keepdim=True))
    acts = f.reshape(32, 4, 8, 8).transpose(0, 1)
    r = redundancy_metrics(acts)
    assert r["erank"] == pytest.approx(k, rel=1e-6)
    assert r["participation_ratio"] == pytest.approx(k, rel=1e-6)
    assert r["k90"] == math.ceil(0.9 * k)
    assert r["stable_rank"] == pytest.approx(k, rel=1e-6)


def test_dead_and_constant_channels_are_excluded():
    acts = _orthogonal_channels(6, seed=3).float()
    dead = torch.zeros(2, 2, 8, 8)
    const = torch.full((2, 1, 8, 8), 3.0)
    full = torch.cat([acts, dead, const], dim=1)  # C = 9, C′ = 6
    r = redundancy_metrics(full)
    assert r["C"] == 9 and r["C_kept"] == 6
    assert r["dead_fraction"] == pytest.approx(2 / 9)
    assert r["constant_fraction"] == pytest.approx(1 / 9)
    assert r["sparsity"] == pytest.approx(2 / 9)
    assert r["erank"] == pytest.approx(6, rel=1e-5)
    assert r["distinct_channels"] == 6
    sim = r["similarity"]
    assert np.isnan(sim["matrix"][6]).all() and np.isfinite(sim["matrix"][:6, :6]).all()


def test_all_dead():
    r = redundancy_metrics(torch.zeros(1, 4, 3, 3))
    assert r["C_kept"] == 0 and r["dead_fraction"] == 1.0
    assert r["erank"] is None and r["warning"]


def test_per_image_mode_and_sample_warning():
    acts = torch.randn(3, 4, 2, 2)
    r = redundancy_metrics(acts, per_image=True)
    assert r["mode"] == "per-image" and r["M"] == 4
    assert r["warning"] is not None
    r2 = redundancy_metrics(torch.randn(4, 4, 8, 8))
    assert r2["mode"] == "pooled" and r2["M"] == 256 and r2["warning"] is None


def test_similarity_matrix_signed_and_subsampled():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 5, 5)
    acts = torch.cat([x, -x, torch.randn(2, 1, 5, 5)], dim=1)
    s = similarity_matrix(acts)
    assert s.shape == (3, 3)
    assert s[0, 1] == pytest.approx(-1.0, abs=1e-9)
    assert np.allclose(np.diag(s), 1.0)
    big = torch.randn(1, 300, 6, 6)
    r = redundancy_metrics(big, max_display=64, order=True)
    assert r["similarity"]["matrix"].shape == (64, 64) and r["similarity"]["subsampled"]
    assert sorted(r["similarity"]["channels"]) == r["similarity"]["channels"] or r["similarity"]["ordered"]
    js = summary(r)
    assert "similarity" not in js


def test_metrics_match_naive_cosine():
    torch.manual_seed(2)
    acts = torch.relu(torch.randn(2, 12, 7, 7))
    r = redundancy_metrics(acts, centred=False, tau=0.5)
    f = acts.double().transpose(0, 1).reshape(12, -1)
    fn = f / f.norm(dim=1, keepdim=True)
    s = (fn @ fn.T).numpy()
    iu = np.triu_indices(12, 1)
    assert r["mean_abs_cos"] == pytest.approx(np.abs(s[iu]).mean(), rel=1e-10)
    assert r["share_pairs_above_tau"] == pytest.approx((np.abs(s[iu]) > 0.5).mean())


def test_bad_arguments():
    with pytest.raises(ValueError, match="tau"):
        redundancy_metrics(torch.randn(1, 2, 3, 3), tau=1.5)
    with pytest.raises(ValueError, match="scale"):
        redundancy_metrics(torch.randn(1, 2, 3, 3), scale="bogus")
    with pytest.raises(ValueError, match="4-D"):
        redundancy_metrics(torch.randn(2, 2, 2, 2, 2))


# --------------------------------------------------------------------------------------- CKA


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_invariances(unbiased):
    torch.manual_seed(0)
    x = torch.randn(40, 12, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    assert linear_cka(x, x, unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, 3.7 * x @ q, unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, x + 5.0, unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)


def test_cka_matches_kernel_formula():
    """Feature-space computation equals the n×n kernel formula (independent implementation)."""
    torch.manual_seed(3)
    x = torch.randn(30, 50, dtype=torch.float64)  # n < p: kernel route inside
    y = torch.randn(30, 7, dtype=torch.float64) + x[:, :7]
    n = 30
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = x @ x.T, y @ y.T
    kc, lc = h @ k @ h, h @ l_ @ h
    biased = float((kc * lc).sum() / torch.sqrt((kc * kc).sum() * (lc * lc).sum()))
    assert linear_cka(x, y, unbiased=False) == pytest.approx(biased, rel=1e-10)

    def hsic1(k, l_):
        k, l_ = k.clone(), l_.clone()
        k.fill_diagonal_(0)
        l_.fill_diagonal_(0)
        one = torch.ones(n, 1, dtype=torch.float64)
        t = torch.trace(k @ l_) + (one.T @ k @ one) * (one.T @ l_ @ one) / ((n - 1) * (n - 2))
        t = t - 2.0 / (n - 2) * (one.T @ k @ l_ @ one)
        return float(t / (n * (n - 3)))

    unb = hsic1(k, l_) / math.sqrt(hsic1(k, k) * hsic1(l_, l_))
    assert linear_cka(x, y, unbiased=True) == pytest.approx(unb, rel=1e-9)
    # same numbers through the n > p (feature-space) route
    x2, y2 = x[:, :5], y[:, :5]
    k2, l2 = x2 @ x2.T, y2 @ y2.T
    unb2 = hsic1(k2, l2) / math.sqrt(hsic1(k2, k2) * hsic1(l2, l2))
    assert linear_cka(x2, y2, unbiased=True) == pytest.approx(unb2, rel=1e-9)


def test_cka_independent_is_small_and_biased_inflated():
    torch.manual_seed(4)
    x = torch.randn(60, 1000, dtype=torch.float64)
    y = torch.randn(60, 1000, dtype=torch.float64)
    b = linear_cka(x, y, unbiased=False)
    u = linear_cka(x, y, unbiased=True)
    assert b > 0.8  # independent features, yet n ≪ p inflates the biased estimator (≈ 0.94 here)
    assert abs(u) < 0.15  # the unbiased one stays near 0 (sd ≈ 0.03 at this n, p)


def test_cka_modes_and_minibatches():
    torch.manual_seed(5)
    a = torch.randn(6, 8, 4, 4)
    b = torch.nn.functional.conv2d(a, torch.randn(5, 8, 1, 1))  # linear map per position
    assert 0.0 <= linear_cka(a, b, mode="positions", unbiased=False) <= 1.0
    assert linear_cka(a, a * 2, mode="images") == pytest.approx(1.0, abs=1e-10)
    with pytest.raises(ValueError, match="h×w"):
        linear_cka(a, torch.randn(6, 8, 2, 2), mode="positions")
    with pytest.raises(ValueError, match="n >= 4"):
        linear_cka(a[:2], a[:2], mode="images", unbiased=True)
    # minibatch accumulation of a perfectly related pair stays 1
    parts = [torch.randn(8, 6) for _ in range(3)]
    assert linear_cka(parts, [2 * p for p in parts]) == pytest.approx(1.0, abs=1e-10)


def test_cka_matrix_structure():
    torch.manual_seed(6)
    base = {"s1": torch.randn(5, 4, 8, 8), "s2": torch.randn(5, 6, 4, 4)}
    var = {"s1": base["s1"] * 2, "s2": torch.randn(5, 6, 4, 4)}
    res = cka_matrix(base, var, mode="positions")
    assert res["matrix"].shape == (2, 2)
    assert res["matrix"][0, 0] == pytest.approx(1.0)
    assert np.isnan(res["matrix"][0, 1]) and "s1|s2" in res["notes"]


def test_correlation_scale_ignores_channel_variance():
    """Orthogonal channels with very unequal variances: covariance spectra see ~1 channel,
    correlation spectra see all C (both through the C×C and the M×M Gram)."""
    c = 12
    acts = _orthogonal_channels(c, seed=7)
    scales = torch.logspace(0, 3, c, dtype=torch.float64).view(1, c, 1, 1)
    acts = acts * scales
    cov = redundancy_metrics(acts, scale="covariance")
    cor = redundancy_metrics(acts, scale="correlation")
    assert cov["participation_ratio"] < 2.0
    assert cor["erank"] == pytest.approx(c, rel=1e-8) and cor["participation_ratio"] == pytest.approx(c, rel=1e-8)
    # M < C′ route: 40 channels on 16 samples; both routes must agree with a direct SVD
    torch.manual_seed(8)
    wide = torch.randn(1, 40, 4, 4, dtype=torch.float64) * torch.logspace(0, 2, 40, dtype=torch.float64).view(1, 40, 1, 1)
    f = wide[0].reshape(40, -1)
    z = (f - f.mean(1, keepdim=True)) / f.std(1, keepdim=True)
    sv = torch.linalg.svdvals(z).numpy()
    sv = sv[sv > sv[0] * 1e-6]
    p = sv / sv.sum()
    r = redundancy_metrics(wide, scale="correlation")
    assert r["erank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-8)


def test_plain_and_centred_selection_agree():
    torch.manual_seed(9)
    acts = torch.relu(torch.randn(2, 300, 6, 6))  # > 256 channels: several row blocks
    a = redundancy_metrics(acts, centred=True)
    b = redundancy_metrics(acts, centred=False)
    assert a["mean_abs_cos_plain"] == pytest.approx(b["mean_abs_cos_plain"], rel=1e-12)
    assert a["mean_abs_cos_centred"] == pytest.approx(b["mean_abs_cos_centred"], rel=1e-12)
    assert b["mean_abs_cos"] == b["mean_abs_cos_plain"] and a["mean_abs_cos"] == a["mean_abs_cos_centred"]
    f = acts.double().transpose(0, 1).reshape(300, -1)
    fn = f / f.norm(dim=1, keepdim=True)
    s = (fn @ fn.T).numpy()
    iu = np.triu_indices(300, 1)
    assert b["mean_abs_cos_plain"] == pytest.approx(np.abs(s[iu]).mean(), rel=1e-10)
    assert np.nanmin(b["similarity"]["matrix"]) >= 0  # plain cosine of post-ReLU features


@pytest.mark.parametrize("centred", [True, False])
def test_wide_path_matches_dense_oracle(centred):
    """C′ > M (the row-block path, no C′×C′ float matrix): every pair metric and the displayed
    sub-matrix equal a dense NumPy oracle; one dead channel is excluded (NaN row in the display)."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(1, 12, 3, 3, generator=g, dtype=torch.float64)
    a = torch.cat([base, base[:, :8] * 2.5 + 0.01 * torch.randn(1, 8, 3, 3, generator=g, dtype=torch.float64),
                   torch.zeros(1, 1, 3, 3, dtype=torch.float64)], 1)  # C = 21 > M = 9; channel 20 dead
    r = redundancy_metrics(a, centred=centred, tau=0.9, max_display=8)
    f = a[0].reshape(21, -1).numpy()[:20]
    if centred:
        f = f - f.mean(1, keepdims=True)
    u = f / np.linalg.norm(f, axis=1, keepdims=True)
    s = np.clip(u @ u.T, -1, 1)
    np.fill_diagonal(s, 1.0)
    iu = np.triu_indices(20, 1)
    assert r["C_kept"] == 20 and r["M"] == 9
    assert r["mean_abs_cos"] == pytest.approx(np.abs(s[iu]).mean(), rel=1e-10)
    adj = np.abs(s) > 0.9
    np.fill_diagonal(adj, False)
    assert r["share_pairs_above_tau"] == pytest.approx(adj[iu].mean())
    assert r["near_duplicate_fraction"] == pytest.approx(adj.any(1).mean())
    parent = list(range(20))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(adj)):
        parent[find(i)] = find(j)
    assert r["distinct_channels"] == len({find(i) for i in range(20)}) < 20
    sim = r["similarity"]
    ch = sim["channels"]
    assert sim["subsampled"] and ch[-1] == 20 and np.isnan(sim["matrix"][-1]).all()
    np.testing.assert_allclose(sim["matrix"][:-1, :-1], s[np.ix_(ch[:-1], ch[:-1])], atol=1e-12)


def test_linear_cka_many_equals_linear_cka():
    from viz.redundancy import linear_cka_many

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 4, 4, generator=g)
    ys = [torch.randn(2, 5, 4, 4, generator=g), x * 3 + 1, torch.randn(2, 9, 4, 4, generator=g)]
    for mode in ("positions",):
        got = linear_cka_many(x, ys, mode=mode)
        assert got == [linear_cka(x, y, mode=mode) for y in ys] and got[1] == pytest.approx(1.0)
    assert linear_cka_many(x, [], mode="positions") == []
    with pytest.raises(ValueError, match="equal h×w"):
        linear_cka_many(x, [torch.randn(2, 5, 3, 3)], mode="positions")


def test_float32_pair_passes_agree_with_float64():
    """``pair_dtype=torch.float32`` (what analyze() uses) changes only the precision of the
    C′×C′ cosine passes of the wide path: every metric agrees with float64 to ~1e-6, the
    spectra are identical (always float64)."""
    g = torch.Generator().manual_seed(11)
    base = torch.relu(torch.randn(1, 64, 5, 5, generator=g))
    a = torch.cat([base, base[:, :40] * 1.7 + 0.05 * torch.randn(1, 40, 5, 5, generator=g)], 1)  # C = 104 > M = 25
    r64 = redundancy_metrics(a, max_display=32)
    r32 = redundancy_metrics(a, max_display=32, pair_dtype=torch.float32)
    assert r64["mean_abs_cos"] != r32["mean_abs_cos"]  # really a different (single-precision) pass
    for k in ("mean_abs_cos", "mean_abs_cos_plain", "mean_abs_cos_centred", "share_pairs_above_tau",
              "near_duplicate_fraction", "distinct_fraction"):
        assert r32[k] == pytest.approx(r64[k], rel=1e-5, abs=1e-7), k
    for k in ("erank", "participation_ratio", "k90", "stable_rank"):
        assert r32[k] == r64[k], k
    np.testing.assert_allclose(r32["similarity"]["matrix"], r64["similarity"]["matrix"], atol=1e-6)
    with pytest.raises(ValueError, match="pair_dtype"):
        redundancy_metrics(a, pair_dtype=torch.float16)


def test_linear_cka_many_float32_agrees():
    from viz.redundancy import linear_cka_many

    g = torch.Generator().manual_seed(5)
    x = torch.relu(torch.randn(2, 48, 8, 8, generator=g))
    ys = [torch.relu(x + 0.7 * torch.randn(2, 48, 8, 8, generator=g)), torch.randn(2, 24, 8, 8, generator=g)]
    got64 = linear_cka_many(x, ys, mode="positions")
    got32 = linear_cka_many(x, ys, mode="positions", dtype=torch.float32)
    assert got32 == pytest.approx(got64, rel=1e-5, abs=1e-6)
    assert got32 != got64
    with pytest.raises(ValueError, match="dtype"):
        linear_cka_many(x, ys, mode="positions", dtype=torch.float16)
