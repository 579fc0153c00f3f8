"""Feature-redundancy metrics of one site's activations, and linear CKA between two sites.

Definitions follow ``reference/analysis.md`` §3. Activations ``A`` (N×C×H×W) become a channel
matrix F ∈ ℝ^{C×M} (each channel flattened over images and positions, M = N·H·W; the per-image
variant uses M = H·W and averages the metrics over images). Everything is computed in float64.

Cost: one C×C Gram ``F Fᵀ`` (C²·M multiply-adds) gives the plain and the centred cosine
matrices (centring is applied algebraically, ``XXᵀ = FFᵀ − M·μμᵀ``); the spectrum comes from the
eigenvalues of whichever Gram is smaller: the C′×C′ one already computed when C′ ≤ M, or the
M×M one ``XᵀX`` when M < C′ (ResNet-50 layer4 at 224²: C = 2048, M = 49), so no O(C³)
eigen-decomposition runs on 2048×2048 when M ≪ C.

All functions are pure: they read tensors and return plain dicts / NumPy arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

#: metric keys that are plain floats (or None), in display order; the charts use these names
SCALAR_KEYS = (
    "dead_fraction",
    "constant_fraction",
    "sparsity",
    "mean_abs_cos",
    "mean_abs_cos_plain",
    "mean_abs_cos_centred",
    "share_pairs_above_tau",
    "near_duplicate_fraction",
    "distinct_channels",
    "distinct_fraction",
    "erank",
    "erank_ratio",
    "participation_ratio",
    "pr_ratio",
    "k90",
    "k90_ratio",
    "k95",
    "k95_ratio",
    "stable_rank",
)

SCALES = ("covariance", "correlation")
CKA_MODES = ("images", "positions")

#: eigenvalues below this fraction of the largest one are treated as exact zeros (round-off)
_EIG_RTOL = 1e-12


def channel_matrix(acts: torch.Tensor) -> torch.Tensor:
    """The C×M float64 channel matrix F of activations (rows = channels, M = N·H·W).

    Args:
        acts: N×C×H×W (or C×H×W, or N×C) activations, any float dtype and device.

    Returns:
        C×M float64 CPU tensor.

    Raises:
        ValueError: for a tensor that is not 2-, 3- or 4-D, or empty.
    """
    if not isinstance(acts, torch.Tensor):
        raise ValueError(f"activations must be a torch.Tensor, got {type(acts).__name__}")
    a = acts.detach()
    if a.dim() == 3:
        a = a.unsqueeze(0)
    if a.dim() == 2:
        a = a[:, :, None, None]
    if a.dim() != 4:
        raise ValueError(f"activations must be N×C×H×W (4-D), got shape {tuple(acts.shape)}")
    if a.numel() == 0:
        raise ValueError(f"activations are empty: shape {tuple(acts.shape)}")
    return a.to(device="cpu", dtype=torch.float64).transpose(0, 1).reshape(a.shape[1], -1)


def _none_if_nan(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _components(adj: np.ndarray) -> int:
    """Number of connected components of an undirected boolean adjacency matrix (n×n).

    Channels without a neighbour are components of their own and are counted at once (usually
    most of them: a Python loop over 2048 isolated channels cost ~14 ms); breadth-first search over
    rows for the rest: every row is read once, O(n²) in total.
    """
    linked = adj.any(axis=1)
    visited = ~linked
    comps = int(visited.sum())
    for i in np.nonzero(linked)[0]:
        if visited[i]:
            continue
        comps += 1
        visited[i] = True
        frontier = np.array([i])
        while frontier.size:
            nb = adj[frontier].any(axis=0) & ~visited
            visited |= nb
            frontier = np.nonzero(nb)[0]
    return comps


_CONTROLLER: ThreadpoolController | None = None


def threadpool_limits(limits: int, user_api: str = "blas") -> Any:
    """``threadpoolctl.threadpool_limits`` through one module-level ``ThreadpoolController`` (made
    on first use): building a controller scans the loaded libraries (~2 ms), a limit is cheap."""
    global _CONTROLLER
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=limits, user_api=user_api)


def _eigvalsh(g: torch.Tensor) -> np.ndarray:
    """Eigenvalues of a symmetric float64 matrix (LAPACK through NumPy, one BLAS thread).

    torch's threaded path can stall badly on an oversubscribed CPU, and so can a multi-threaded
    OpenBLAS right after a torch matmul (torch's OpenMP workers are still spinning: 256×256 took
    0.5 s instead of 6 ms), so OpenBLAS is limited to one thread for the call (threadpoolctl);
    the matrices here are at most C′ ≤ M or M×M, small enough for one core.
    """
    with threadpool_limits(1, user_api="blas"):
        return np.linalg.eigvalsh(g.numpy())


def _spectral(lam: np.ndarray, m: int) -> dict[str, float]:
    """Spectral metrics from the non-negative eigenvalues of the centred Gram (σ_k²)."""
    lam = np.sort(np.clip(lam, 0.0, None))[::-1]
    if lam.size == 0 or lam[0] <= 0:
        return {k: float("nan") for k in ("erank", "participation_ratio", "k90", "k95", "stable_rank")}
    lam = np.where(lam < lam[0] * _EIG_RTOL, 0.0, lam)
    sigma = np.sqrt(lam)
    p = sigma / sigma.sum()
    nz = p[p > 0]
    erank = float(np.exp(-(nz * np.log(nz)).sum()))  # Roy & Vetterli: singular values, not σ²
    ev = lam / max(m - 1, 1)  # covariance eigenvalues
    pr = float(ev.sum() ** 2 / (ev**2).sum())
    cum = np.cumsum(ev) / ev.sum()
    k90 = int(np.searchsorted(cum, 0.90 - 1e-9) + 1)
    k95 = int(np.searchsorted(cum, 0.95 - 1e-9) + 1)
    stable = float(lam.sum() / lam[0])
    return {"erank": erank, "participation_ratio": pr, "k90": k90, "k95": k95, "stable_rank": stable}


def _core(
    f: torch.Tensor,
    *,
    tau: float,
    centred: bool,
    scale: str,
    eps_abs: float,
    const_rel: float,
    keep_matrix: bool,
    max_display: int | None = None,
    pair_dtype: torch.dtype = torch.float64,
) -> dict[str, Any]:
    """Metrics of one C×M float64 channel matrix.

    ``max_display`` (with ``keep_matrix``): only the kept channels that
    :func:`_display_matrix` will show are returned in ``_sim`` (a sub-matrix and their indices).
    When C′ > M the C′×C′ matrices are never stored: see :func:`_wide`.

    C′ ≤ M: the one C′×C′ Gram ``F Fᵀ`` gives the plain cosines, is centred in place
    (``G − M·μμᵀ``), gives the spectrum and is normalised into the centred cosine matrix (NumPy,
    one BLAS thread). C′ > M (ResNet-50 ``layer3``/``layer4``: 2048×2048 matrices of 32 MB):
    :func:`_wide` reduces the cosine matrices row block by row block and takes the spectrum from
    the M×M Gram. Channel statistics (mean, variance) come from the rows directly.
    """
    c, m = f.shape
    absmax = torch.maximum(f.amax(dim=1), -f.amin(dim=1))  # (aminmax is several times slower)
    mean = f.sum(dim=1) / m
    sumsq = torch.einsum("ij,ij->i", f, f)
    var = (sumsq / m - mean * mean).clamp_min(0.0)  # population variance
    dead = absmax <= eps_abs
    mean_var = float(var.mean())
    constant = (var <= const_rel * mean_var) & ~dead
    kept = ~(dead | constant)
    kept_idx = torch.nonzero(kept).flatten()
    ck = int(kept_idx.numel())
    zeros = (f.abs() <= eps_abs).sum()
    out: dict[str, Any] = {
        "C": c,
        "C_kept": ck,
        "M": m,
        "dead_fraction": float(dead.sum()) / c,
        "constant_fraction": float(constant.sum()) / c,
        "sparsity": float(zeros) / f.numel(),
        "rank_cap": min(ck, m - 1) if ck else 0,
    }
    nan = float("nan")
    if ck == 0:
        out.update({k: nan for k in SCALAR_KEYS if k not in out})
        out["_sim"] = None
        return out
    show = _display_positions(c, kept_idx, max_display) if keep_matrix else None
    if ck > m:  # wide: no C′×C′ float64 matrix at all
        out.update(_wide(f[kept_idx] if ck < c else f, mean[kept_idx], sumsq[kept_idx], tau=tau,
                         centred=centred, scale=scale, show=show, pair_dtype=pair_dtype))
        spec = _spectral(out.pop("_lam"), m)
        out.update(spec)
        out["erank_ratio"] = spec["erank"] / ck
        out["pr_ratio"] = spec["participation_ratio"] / ck
        out["k90_ratio"] = spec["k90"] / ck
        out["k95_ratio"] = spec["k95"] / ck
        sub = out.pop("_show")
        out["_sim"] = (sub, kept_idx.numpy()[show]) if keep_matrix else None
        return out

    fk = f[kept_idx] if ck < c else f
    gram_t = fk @ fk.T  # C′×C′ (C′ ≤ M here): the only C′²·M product
    mu = mean[kept_idx].numpy()
    pairs = ck * (ck - 1)
    # the C′×C′ passes in NumPy with one BLAS thread: small matrices (≤ M² entries), where each
    # torch op's OpenMP barrier costs more than the work on a busy CPU
    with threadpool_limits(1, user_api="blas"):
        gram = gram_t.numpy()
        nrm_p = np.sqrt(np.clip(gram.diagonal(), 1e-300, None))
        s_plain = np.clip(gram / nrm_p[:, None] / nrm_p[None, :], -1.0, 1.0)
        np.fill_diagonal(s_plain, 1.0)
        plain_sum = float(np.abs(s_plain).sum())
        gram -= float(m) * np.outer(mu, mu)  # in place: X Xᵀ of the row-centred matrix
        nrm_c = np.sqrt(np.clip(gram.diagonal(), 1e-300, None))
        # spectrum of the C′×C′ Gram (non-zero eigenvalues of X Xᵀ and Xᵀ X coincide)
        if scale == "covariance":
            lam = np.linalg.eigvalsh(gram)
        s_cent = gram
        s_cent /= nrm_c[:, None]
        s_cent /= nrm_c[None, :]
        np.clip(s_cent, -1.0, 1.0, out=s_cent)
        np.fill_diagonal(s_cent, 1.0)
        if scale == "correlation":
            lam = np.linalg.eigvalsh(s_cent) * (m - 1)  # standardised rows: X Xᵀ = (M−1)·R
        s = s_cent if centred else s_plain

        if ck >= 2:
            cent_sum = float(np.abs(s_cent).sum())
            out["mean_abs_cos_plain"] = (plain_sum - ck) / pairs
            out["mean_abs_cos_centred"] = (cent_sum - ck) / pairs
            out["mean_abs_cos"] = out["mean_abs_cos_centred" if centred else "mean_abs_cos_plain"]
            np.fill_diagonal(s, 0.0)
            adj = np.abs(s) > tau
            np.fill_diagonal(s, 1.0)
            out["share_pairs_above_tau"] = float(adj.sum()) / pairs
            out["near_duplicate_fraction"] = float(adj.any(axis=1).sum()) / ck
            comps = _components(adj)
        else:
            for k in ("mean_abs_cos_plain", "mean_abs_cos_centred", "mean_abs_cos", "share_pairs_above_tau"):
                out[k] = nan
            out["near_duplicate_fraction"] = 0.0
            comps = 1
    out["distinct_channels"] = comps
    out["distinct_fraction"] = comps / ck

    spec = _spectral(lam, m)
    out.update(spec)
    out["erank_ratio"] = spec["erank"] / ck
    out["pr_ratio"] = spec["participation_ratio"] / ck
    out["k90_ratio"] = spec["k90"] / ck
    out["k95_ratio"] = spec["k95"] / ck
    if keep_matrix:
        assert show is not None
        out["_sim"] = (s[np.ix_(show, show)], kept_idx.numpy()[show])
    else:
        out["_sim"] = None
    return out


def _display_positions(c: int, kept_idx: torch.Tensor, max_display: int | None) -> np.ndarray:
    """Positions (among the kept channels, ascending) of the channels :func:`_display_matrix` shows."""
    ck = int(kept_idx.numel())
    if max_display is None or c <= max_display:
        return np.arange(ck)
    idx = np.unique(np.linspace(0, c - 1, max_display).round().astype(int))
    pos = np.full(c, -1)
    pos[kept_idx.numpy()] = np.arange(ck)
    p = pos[idx]
    return np.unique(p[p >= 0])


def _wide(
    fk: torch.Tensor,
    mu: torch.Tensor,
    sumsq: torch.Tensor,
    *,
    tau: float,
    centred: bool,
    scale: str,
    show: np.ndarray | None,
    pair_dtype: torch.dtype = torch.float64,
) -> dict[str, Any]:
    """Pairwise and spectral metrics when C′ > M (ResNet-50 ``layer3``/``layer4`` at 224²).

    The cosine matrices are made in row blocks straight from unit-norm rows (``Û Ûᵀ``, float64,
    each block small enough to stay in cache) and reduced on the spot: Σ|S|, the |S| > τ
    adjacency (the only C′×C′ array kept, boolean) and the displayed rows. Same definitions as the
    Gram path (clamped to [−1, 1], unit diagonal), ≈ 4× less memory traffic than transforming
    32 MB float64 matrices in place; values agree with it to float64 rounding (~1e-15).
    The spectrum comes from the M×M Gram ``XᵀX`` of the centred rows (always float64).
    ``pair_dtype=torch.float32`` runs the C′×C′ cosine passes in single precision (half the
    memory traffic and BLAS time; cosines agree with float64 to ~1e-7, so only pairs within
    ~1e-7 of τ can change side).
    """
    ck, m = fk.shape
    nrm_p = sumsq.clamp_min(1e-300).sqrt()
    xc = fk - mu[:, None]
    nrm_c = torch.einsum("ij,ij->i", xc, xc).clamp_min(1e-300).sqrt()
    x = xc if scale == "covariance" else xc / (nrm_c / math.sqrt(max(m - 1, 1)))[:, None]
    lam = _eigvalsh(x.T @ x)  # M×M
    un_p = (fk / nrm_p[:, None]).to(pair_dtype).numpy()
    un_c = (xc / nrm_c[:, None]).to(pair_dtype).numpy()
    sel, other = (un_c, un_p) if centred else (un_p, un_c)
    adj = np.empty((ck, ck), dtype=bool)
    sub = np.empty((len(show), len(show))) if show is not None else None  # float64 display rows
    rows = {int(r): i for i, r in enumerate(show)} if show is not None else {}
    sel_sum = other_sum = 0.0
    step = max(1, (1 << 16) // ck)
    # NumPy, one BLAS thread: many small ops, where torch's OpenMP barriers cost ~ms each on a busy CPU
    with threadpool_limits(1, user_api="blas"):
        buf = np.empty((step, ck), dtype=un_p.dtype)
        for i in range(0, ck, step):
            j = min(i + step, ck)
            blk = np.matmul(other[i:j], other.T, out=buf[: j - i])
            np.clip(blk, -1.0, 1.0, out=blk)
            np.abs(blk, out=blk)
            d = np.arange(j - i)
            blk[d, d + i] = 0.0
            other_sum += float(blk.sum(dtype=np.float64))
            blk = np.matmul(sel[i:j], sel.T, out=buf[: j - i])
            np.clip(blk, -1.0, 1.0, out=blk)
            blk[d, d + i] = 1.0
            if sub is not None:
                local = [r for r in range(i, j) if r in rows]
                if local:
                    sub[[rows[r] for r in local]] = blk[np.asarray(local) - i][:, show]
            blk[d, d + i] = 0.0
            np.abs(blk, out=blk)
            sel_sum += float(blk.sum(dtype=np.float64))
            np.greater(blk, tau, out=adj[i:j])
    pairs = ck * (ck - 1)
    out: dict[str, Any] = {"_lam": lam, "_show": sub}
    if ck >= 2:
        out["mean_abs_cos_plain"] = (other_sum if centred else sel_sum) / pairs
        out["mean_abs_cos_centred"] = (sel_sum if centred else other_sum) / pairs
        out["mean_abs_cos"] = out["mean_abs_cos_centred" if centred else "mean_abs_cos_plain"]
        out["share_pairs_above_tau"] = float(adj.sum()) / pairs
        out["near_duplicate_fraction"] = float(adj.any(axis=1).sum()) / ck
        comps = _components(adj)
    else:
        for k in ("mean_abs_cos_plain", "mean_abs_cos_centred", "mean_abs_cos", "share_pairs_above_tau"):
            out[k] = float("nan")
        out["near_duplicate_fraction"] = 0.0
        comps = 1
    out["distinct_channels"] = comps
    out["distinct_fraction"] = comps / ck
    return out


def _display_matrix(
    sim: np.ndarray, kept_idx: np.ndarray, c: int, *, max_channels: int | None, order: bool
) -> dict[str, Any]:
    """C×C display matrix (NaN rows/cols for excluded channels), subsampled and optionally ordered."""
    idx = np.arange(c)
    if max_channels is not None and c > max_channels:
        idx = np.unique(np.linspace(0, c - 1, max_channels).round().astype(int))
    pos = np.full(c, -1)
    pos[kept_idx] = np.arange(len(kept_idx))
    p = pos[idx]
    if (p >= 0).all():
        sub = sim[np.ix_(p, p)] if len(p) < sim.shape[0] or not (np.diff(p) == 1).all() else sim.copy()
    else:
        sub = np.full((len(idx), len(idx)), np.nan)
        ok = np.nonzero(p >= 0)[0]
        sub[np.ix_(ok, ok)] = sim[np.ix_(p[ok], p[ok])]
    if order and len(idx) > 2:
        sub, idx = _order(sub, idx)
    return {"matrix": sub, "channels": idx.tolist(), "subsampled": len(idx) < c, "ordered": bool(order)}


def _order(sub: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy nearest-neighbour ordering on |S| (groups similar channels); excluded ones last."""
    a = np.nan_to_num(np.abs(sub), nan=-1.0)
    n = a.shape[0]
    valid = ~np.isnan(sub.diagonal())
    remaining = set(np.nonzero(valid)[0].tolist())
    seq: list[int] = []
    if remaining:
        cur = max(remaining, key=lambda i: (a[i, list(remaining)]).sum())
        while remaining:
            seq.append(cur)
            remaining.discard(cur)
            if not remaining:
                break
            rem = np.fromiter(remaining, dtype=int)
            cur = int(rem[np.argmax(a[cur, rem])])
    seq += [i for i in range(n) if not valid[i]]
    p = np.asarray(seq, dtype=int)
    return sub[np.ix_(p, p)], idx[p]


def redundancy_metrics(
    acts: torch.Tensor,
    *,
    tau: float = 0.9,
    centred: bool = True,
    scale: str = "covariance",
    per_image: bool = False,
    eps_abs: float = 1e-8,
    const_rel: float = 1e-6,
    similarity: bool = True,
    max_display: int | None = 256,
    order: bool = False,
    pair_dtype: torch.dtype = torch.float64,
) -> dict[str, Any]:
    """Redundancy metrics of one site's activations (analysis.md §3).

    Args:
        acts: N×C×H×W activations of the site (any float dtype/device; read only).
        tau: |cosine| threshold for near-duplicates, pair share and distinct channels, in (0, 1).
        centred: pairwise metrics and the display matrix use centred cosine (Pearson r; default)
            or plain cosine (biased high for post-ReLU features). Both means are always reported.
        scale: "covariance" (spectra of the centred channel matrix; high-variance channels
            dominate) or "correlation" (rows standardised first).
        per_image: False: pool all images (M = N·H·W, more stable). True: M = H·W per image and
            every metric averaged over images (closer to paper figures).
        eps_abs: a channel with max|f_i| ≤ eps_abs is dead.
        const_rel: a live channel with var f_i ≤ const_rel·mean_j var f_j is constant.
        similarity: include the display similarity matrix under ``"similarity"``.
        max_display: subsample the display matrix to at most this many evenly spaced channels
            (None: all C).
        order: reorder the display matrix so similar channels sit together.
        pair_dtype: precision of the C′×C′ cosine passes when C′ > M (the row-block path; the
            spectra, channel statistics and the C′ ≤ M path are always float64). float32 halves
            their cost; cosines then agree with float64 to ~1e-7 (the analysis engine uses it).

    Returns:
        dict with (C′ = channels kept after excluding dead and constant ones):

        - ``C``, ``C_kept``, ``N``, ``H``, ``W``, ``M`` (samples per channel), ``mode``
          ("pooled" | "per-image"), ``centred``, ``scale``, ``tau``;
        - ``dead_fraction``, ``constant_fraction`` (live but constant), ``sparsity`` (share of
          |a| ≤ eps_abs over all entries), all of C, in [0, 1];
        - ``mean_abs_cos`` (the selected cosine), ``mean_abs_cos_plain``,
          ``mean_abs_cos_centred``: mean |S_ij| over i < j, in [0, 1];
        - ``share_pairs_above_tau``, ``near_duplicate_fraction`` (#{i: max_j |S_ij| > τ}/C′),
          in [0, 1]; ``distinct_channels`` (connected components of |S_ij| > τ, 1…C′) and
          ``distinct_fraction`` (/C′);
        - ``erank`` (Roy & Vetterli, on singular values, in [1, rank]), ``participation_ratio``
          (in [1, C′]), ``k90``/``k95`` (components holding 90/95 % of the variance),
          ``stable_rank``, each also divided by C′ as ``*_ratio``;
        - ``rank_cap`` = min(C′, M−1) and ``warning`` (str or None) when M < 10·C′;
        - ``similarity`` (if requested): ``{"matrix": K×K float64 ndarray in [−1, 1] with NaN
          rows/cols for excluded channels, "channels": original channel indices (K), "centred",
          "subsampled", "ordered"}``. For per-image mode it is the first image's matrix.

        Undefined values (e.g. pair metrics with C′ < 2) are None. Use :func:`summary` for a
        JSON-ready copy without the matrix.

    Raises:
        ValueError: bad shape, tau outside (0, 1), unknown scale.
    """
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must be in (0, 1), got {tau!r}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {SCALES}")
    f_all = channel_matrix(acts)
    a4 = acts if acts.dim() == 4 else (acts.unsqueeze(0) if acts.dim() == 3 else acts[:, :, None, None])
    n, c, h, w = (int(v) for v in a4.shape)
    if pair_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"pair_dtype must be torch.float32 or torch.float64, got {pair_dtype!r}")
    kw = {"tau": tau, "centred": centred, "scale": scale, "eps_abs": eps_abs, "const_rel": const_rel,
          "pair_dtype": pair_dtype}
    if per_image and n > 1:
        runs = [_core(f_all[:, i * h * w : (i + 1) * h * w], keep_matrix=(i == 0), max_display=max_display, **kw)
                for i in range(n)]
        res: dict[str, Any] = {}
        for k in (*SCALAR_KEYS, "C_kept", "rank_cap"):
            vals = [r[k] for r in runs if r.get(k) is not None and math.isfinite(r[k])]
            res[k] = float(np.mean(vals)) if vals else float("nan")
        res["C"] = c
        res["M"] = h * w
        res["_sim"] = runs[0]["_sim"]
        mode = "per-image"
    else:
        res = _core(f_all, keep_matrix=similarity, max_display=max_display, **kw)
        mode = "pooled"
    ck = res["C_kept"]
    m = res["M"]
    warning = None
    if ck == 0:
        warning = "every channel is dead or constant; nothing to measure"
    elif m < 10 * ck:
        warning = (
            f"only M = {m} samples for C' = {ck:g} channels (< 10·C'): spectral metrics are capped at "
            f"rank {min(int(ck), m - 1)}; use more images or an earlier stage"
        )
    sim = res.pop("_sim")
    out: dict[str, Any] = {
        "C": c,
        "C_kept": ck,
        "N": n,
        "H": h,
        "W": w,
        "M": m,
        "mode": mode,
        "centred": centred,
        "scale": scale,
        "tau": tau,
    }
    for k in SCALAR_KEYS:
        out[k] = _none_if_nan(res.get(k, float("nan")))
    for k in ("distinct_channels", "k90", "k95"):
        if out[k] is not None and mode == "pooled":
            out[k] = int(out[k])
    out["rank_cap"] = res["rank_cap"]
    out["warning"] = warning
    if similarity and sim is not None:
        out["similarity"] = {**_display_matrix(sim[0], sim[1], c, max_channels=max_display, order=order),
                             "centred": centred}
    elif similarity:
        out["similarity"] = None
    return out


def summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready copy of :func:`redundancy_metrics` output (drops the similarity matrix)."""
    return {k: v for k, v in metrics.items() if k != "similarity"}


def similarity_matrix(
    acts: torch.Tensor,
    *,
    centred: bool = True,
    max_channels: int | None = None,
    order: bool = False,
) -> np.ndarray:
    """Signed channel-similarity matrix for display.

    Args:
        acts: N×C×H×W activations.
        centred: centred cosine (Pearson r, default) or plain cosine.
        max_channels: keep at most this many evenly spaced channels (None: all).
        order: reorder so that similar channels are adjacent (greedy, by |S|).

    Returns:
        K×K float64 array in [−1, 1] (K = C, or ≤ max_channels); rows/columns of dead or
        constant channels are NaN. Use :func:`redundancy_metrics` (``similarity=True``) to get
        the channel indices of a subsampled/ordered matrix too.
    """
    res = redundancy_metrics(acts, centred=centred, max_display=max_channels, order=order, similarity=True)
    sim = res["similarity"]
    if sim is None:
        c = int(res["C"])
        k = c if max_channels is None else min(c, max_channels)
        return np.full((k, k), np.nan)
    return sim["matrix"]


# ----------------------------------------------------------------------------------------- CKA


def _features(x: torch.Tensor, mode: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """n×p feature matrix (``dtype``, default float64) for CKA: images → GAP (n = N), positions → n = N·h·w."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"CKA inputs must be tensors, got {type(x).__name__}")
    x = x.detach().to(device="cpu", dtype=dtype)
    if x.dim() == 2:
        return x
    if x.dim() != 4:
        raise ValueError(f"CKA inputs must be n×p or N×C×H×W, got shape {tuple(x.shape)}")
    if mode == "images":
        return x.mean(dim=(2, 3))
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _check_pair(x: torch.Tensor, y: torch.Tensor, mode: str) -> None:
    if mode not in CKA_MODES:
        raise ValueError(f"unknown CKA mode {mode!r}; choose one of {CKA_MODES}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples: batch {x.shape[0]} vs {y.shape[0]}")
    if mode == "positions" and x.dim() == 4 and y.dim() == 4 and x.shape[2:] != y.shape[2:]:
        raise ValueError(
            f"positions-mode CKA needs equal h×w, got {tuple(x.shape[2:])} vs {tuple(y.shape[2:])}; "
            "use mode='images'"
        )


def _hsic_terms(x: torch.Tensor, y: torch.Tensor, unbiased: bool) -> float:
    """HSIC of the linear kernels of x (n×p) and y (n×q), without forming n×n kernels.

    Biased: ‖Yᵀ X‖²_F with centred columns (the (n−1)² factor cancels in CKA).
    Unbiased (Song et al. 2012, as used by Nguyen et al. 2021), K̃/L̃ with zeroed diagonals:
    [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)).
    """
    n = x.shape[0]
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    if n <= max(x.shape[1], y.shape[1]):
        k = x @ x.T
        lmat = y @ y.T
        if not unbiased:
            return float((k * lmat).sum())
        k.fill_diagonal_(0.0)
        lmat.fill_diagonal_(0.0)
        k1, l1 = k.sum(dim=1), lmat.sum(dim=1)
        tr = float((k * lmat).sum())
        return (tr + float(k1.sum()) * float(l1.sum()) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(k1 @ l1)) / (
            n * (n - 3)
        )
    xty = y.T @ x  # q×p
    if not unbiased:
        return float((xty * xty).sum())
    dk = (x * x).sum(dim=1)  # diag K
    dl = (y * y).sum(dim=1)
    tr = float((xty * xty).sum()) - float((dk * dl).sum())
    k1 = x @ x.sum(dim=0) - dk  # K̃1
    l1 = y @ y.sum(dim=0) - dl
    return (tr + float(k1.sum()) * float(l1.sum()) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(k1 @ l1)) / (
        n * (n - 3)
    )


def _as_batches(x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def linear_cka(
    x: torch.Tensor | Sequence[torch.Tensor],
    y: torch.Tensor | Sequence[torch.Tensor],
    *,
    unbiased: bool = True,
    mode: str = "images",
) -> float:
    """Linear CKA (Kornblith et al. 2019) between two representations of the same examples.

    Args:
        x: N×C₁×h₁×w₁ activations or an n×p₁ feature matrix; or a list of such minibatches.
        y: the same examples at another site (N×C₂×h₂×w₂ or n×p₂); same batching as ``x``.
        unbiased: True: the unbiased HSIC estimator accumulated over minibatches (Nguyen et al.
            2021; needs n ≥ 4 per batch; use it whenever n is not ≫ p, the biased one is inflated
            when n ≪ p). False: the biased estimator ‖YᵀX‖²_F / (‖XᵀX‖_F‖YᵀY‖_F) on all
            examples (minibatches concatenated).
        mode: "images": globally pooled features, n = N. "positions": n = N·h·w, needs equal h×w.

    Returns:
        CKA, in [0, 1] for the biased estimator (the unbiased one may leave it slightly); NaN
        when a representation has no variance.

    Raises:
        ValueError: mismatched examples, unequal h×w in positions mode, unknown mode, or fewer
            than 4 examples per batch for the unbiased estimator.
    """
    xb, yb = _as_batches(x), _as_batches(y)
    if len(xb) != len(yb) or not xb:
        raise ValueError(f"x and y must have the same number of minibatches, got {len(xb)} and {len(yb)}")
    for a, b in zip(xb, yb):
        _check_pair(a, b, mode)
    fx = [_features(a, mode) for a in xb]
    fy = [_features(b, mode) for b in yb]
    if not unbiased:
        fx, fy = [torch.cat(fx)], [torch.cat(fy)]
    hxy = hxx = hyy = 0.0
    for a, b in zip(fx, fy):
        if unbiased and a.shape[0] < 4:
            raise ValueError(
                f"the unbiased CKA estimator needs n >= 4 examples per batch, got n = {a.shape[0]} "
                f"(mode {mode!r}); use mode='positions' or more images"
            )
        hxy += _hsic_terms(a, b, unbiased)
        hxx += _hsic_terms(a, a, unbiased)
        hyy += _hsic_terms(b, b, unbiased)
    den = math.sqrt(hxx * hyy) if hxx > 0 and hyy > 0 else 0.0
    if den <= 0:
        return float("nan")
    return hxy / den


def linear_cka_many(
    x: torch.Tensor,
    ys: Sequence[torch.Tensor],
    *,
    unbiased: bool = True,
    mode: str = "images",
    dtype: torch.dtype = torch.float64,
) -> list[float]:
    """``[linear_cka(x, y) for y in ys]`` with x's features and self-HSIC computed once.

    Args:
        x: N×C×h×w activations or an n×p feature matrix (one batch), e.g. the baseline's stage.
        ys: the same examples at other sites / models.
        unbiased, mode: see :func:`linear_cka`.
        dtype: precision of the HSIC products. float64 (default) is bit-identical to
            :func:`linear_cka`; float32 is 2–3× faster on CPU and agrees to ~1e-6 (the analysis
            engine uses it for display values).

    Returns:
        One CKA per ``y`` (with float64: bit-identical to :func:`linear_cka`, same HSIC terms).

    Raises:
        ValueError: as :func:`linear_cka`.
    """
    for y in ys:
        _check_pair(x, y, mode)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    fx = _features(x, mode, dtype)
    if not ys:
        return []
    if unbiased and fx.shape[0] < 4:
        raise ValueError(
            f"the unbiased CKA estimator needs n >= 4 examples per batch, got n = {fx.shape[0]} "
            f"(mode {mode!r}); use mode='positions' or more images"
        )
    hxx = _hsic_terms(fx, fx, unbiased)
    out = []
    for y in ys:
        fy = _features(y, mode, dtype)
        hxy = _hsic_terms(fx, fy, unbiased)
        hyy = _hsic_terms(fy, fy, unbiased)
        den = math.sqrt(hxx * hyy) if hxx > 0 and hyy > 0 else 0.0
        out.append(float("nan") if den <= 0 else hxy / den)
    return out


def cka_matrix(
    xs: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
    ys: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
    *,
    unbiased: bool = True,
    mode: str = "images",
) -> dict[str, Any]:
    """Stage × stage linear CKA, e.g. baseline stages (rows) × variant stages (columns).

    Args:
        xs: row name -> activations (N×C×h×w, or minibatch list), e.g. the baseline's stages.
        ys: column name -> activations of the same images, e.g. a variant's stages.
        unbiased, mode: see :func:`linear_cka`.

    Returns:
        ``{"rows": [...], "cols": [...], "matrix": R×K float ndarray (NaN where undefined),
        "notes": {"row|col": reason}, "mode", "unbiased", "estimator"}``.
    """
    rows, cols = list(xs), list(ys)
    mat = np.full((len(rows), len(cols)), np.nan)
    notes: dict[str, str] = {}
    for i, r in enumerate(rows):
        for j, cname in enumerate(cols):
            try:
                mat[i, j] = linear_cka(xs[r], ys[cname], unbiased=unbiased, mode=mode)
            except ValueError as e:
                notes[f"{r}|{cname}"] = str(e)
    return {
        "rows": rows,
        "cols": cols,
        "matrix": mat,
        "notes": notes,
        "mode": mode,
        "unbiased": unbiased,
        "estimator": "unbiased HSIC (Nguyen et al. 2021)" if unbiased else "biased HSIC (Kornblith et al. 2019)",
    }
