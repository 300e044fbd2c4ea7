"""Exact eigenvalue counts, histograms and eigsh against torch.linalg.eigvalsh."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import CASES, DT, build, reference_loss_fn
from test_solve import tanh_mlp

import hessinv
from hessinv import spectrum


def dense_eigvals(model, loss, X, y):
    f, x0 = reference_loss_fn(model, loss, X, y)
    return torch.linalg.eigvalsh(torch.func.hessian(f)(x0))


def gap_shifts(ev, n, rel_gap=1e-6):
    """Up to ``n`` shifts halfway between consecutive eigenvalues that are well separated."""
    nrm = float(ev.abs().max())
    e = ev.numpy()
    gaps = np.diff(e)
    ok = np.nonzero(gaps > rel_gap * nrm)[0]
    pick = ok[np.linspace(0, len(ok) - 1, min(n, len(ok))).astype(int)]
    return [float(0.5 * (e[i] + e[i + 1])) for i in pick]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_counts_in_gaps(case):
    model, loss, X, y = build(case)
    H = hessinv.Hessian(model, loss, X, y)
    ev = dense_eigvals(model, loss, X, y)
    shifts = gap_shifts(ev, 6)
    for s in shifts:
        assert H.eigenvalue_count(s) == int((ev < s).sum()), s
    nrm = float(ev.abs().max())
    edges = sorted({-1.01 * nrm, *shifts, 1.01 * nrm})
    h = H.spectral_histogram(edges)
    ref = np.histogram(ev.numpy(), bins=np.asarray(edges))[0]
    assert h.counts.tolist() == ref.tolist()
    assert h.below == 0 and h.above == 0 and h.counts.sum() == H.num_params
    assert h.at_edges.tolist() == [0] * len(edges)


def test_histogram_deep_indefinite():
    model, loss, X, y = tanh_mlp(16, 8, 16)
    H = hessinv.Hessian(model, loss, X, y)
    ev = dense_eigvals(model, loss, X, y)
    edges = sorted(gap_shifts(ev, 12))
    h = H.spectral_histogram(edges)
    assert h.counts.tolist() == np.histogram(ev.numpy(), bins=np.asarray(edges))[0].tolist()
    assert h.below == int((ev < edges[0]).sum())
    # the histogram is verified exactly when every inertia it read says so
    flags = [getattr(H.inertia(-e), "verified", None) for e in edges]
    assert h.verified == (None if None in flags else all(flags))


def test_histogram_reports_unverified_counts(monkeypatch):
    """An unverified inertia, or one that warns LiftedPrecisionWarning, unverifies the histogram."""
    import warnings

    model, loss, X, y = tanh_mlp(4, 3, 4)
    H = hessinv.Hessian(model, loss, X, y)
    real_factor = H.factor

    class Flagged(tuple):
        verified = False

    class Fac:
        def __init__(self, fac, mode):
            self.fac, self.mode = fac, mode

        def inertia(self):
            r = self.fac.inertia()
            if self.mode == "unverified":
                return Flagged(tuple(r))
            warnings.warn("test", hessinv.LiftedPrecisionWarning, stacklevel=2)
            return tuple(r)

    for mode in ("unverified", "warns"):
        monkeypatch.setattr(H, "factor", lambda d, *a, mode=mode, **k: Fac(real_factor(d), mode))
        if mode == "warns":
            with pytest.warns(hessinv.LiftedPrecisionWarning):
                h = H.spectral_histogram([-1.0, 0.5, 1.0])
        else:
            h = H.spectral_histogram([-1.0, 0.5, 1.0])
        assert h.verified is False
    monkeypatch.setattr(H, "factor", real_factor)
    assert H.spectral_histogram([-1.0, 0.5, 1.0]).verified in (True, False)


def test_zero_eigenvalues_fall_in_the_bin_they_open():
    """Exact null directions (batch 2) are eigenvalue 0: counted in [0, e), not in [e', 0)."""
    model, loss, X, y = tanh_mlp(4, 4, 2)
    H = hessinv.Hessian(model, loss, X, y)
    ev = dense_eigvals(model, loss, X, y)
    nrm = float(ev.abs().max())
    tiny = 1e-9 * nrm
    h = H.spectral_histogram([-2 * nrm, 0.0, 2 * nrm])
    n_zero = int((ev.abs() <= tiny).sum())
    assert n_zero > 0
    assert h.counts.tolist() == [int((ev < -tiny).sum()), int((ev > -tiny).sum())]
    assert h.at_edges[1] >= n_zero


@pytest.mark.parametrize("c", [1e-12, 1e12])
def test_counts_scale_with_the_loss(c):
    model, loss, X, y = tanh_mlp(8, 4, 4)
    ev = dense_eigvals(model, loss, X, y)
    Hc = hessinv.Hessian(model, lambda out, t: c * loss(out, t), X, y)
    for s in gap_shifts(ev, 4):
        assert Hc.eigenvalue_count(c * s) == int((ev < s).sum())


def check_pairs(H, vals, vecs, ref, nrm):
    assert float((vals - ref).abs().max()) <= 1e-8 * nrm, (vals, ref)
    res = torch.linalg.vector_norm(H.matmat(vecs) - vecs * vals, dim=0)
    assert float(res.max()) <= 1e-8 * nrm
    gram = vecs.T @ vecs
    assert float((gram - torch.eye(vecs.shape[1], dtype=DT)).abs().max()) <= 1e-8


@pytest.fixture(scope="module")
def deep():
    model, loss, X, y = tanh_mlp(12, 5, 6)
    H = hessinv.Hessian(model, loss, X, y)
    ev = dense_eigvals(model, loss, X, y)
    return H, ev, float(ev.abs().max())


@pytest.mark.parametrize("which", ["LM", "LA", "SA", "BE"])
def test_eigsh_extreme(deep, which):
    H, ev, nrm = deep
    k = 4
    vals, vecs = H.eigsh(k, which=which)
    if which == "LA":
        ref = ev[-k:]
    elif which == "SA":
        ref = ev[:k]
    elif which == "LM":
        ref = ev[torch.argsort(ev.abs(), descending=True)[:k]].sort().values
    else:
        ref = torch.cat([ev[: k // 2], ev[-(k - k // 2) :]])
    check_pairs(H, vals, vecs, ref, nrm)


def test_eigsh_interior(deep):
    H, ev, nrm = deep
    for s in gap_shifts(ev, 3):
        vals, vecs = H.eigsh(3, sigma=s)
        ref = ev[torch.argsort((ev - s).abs())[:3]].sort().values
        check_pairs(H, vals, vecs, ref, nrm)


def test_eigsh_interior_with_every_wanted_eigenvalue_above_sigma(deep):
    """sigma just below an interior eigenvalue whose upper neighbours are nearer than its lower.

    The k nearest then all lie above sigma while eigenvalues lie below it too: the counts
    must be taken in the window around sigma, not as if sigma were below the spectrum.
    """
    H, ev, nrm = deep
    e = ev.numpy()
    tried = 0
    for i in range(1, len(e) - 3):
        below_gap, above_gap = e[i] - e[i - 1], e[i + 2] - e[i]
        if below_gap > 1e-6 * nrm and above_gap < 0.5 * below_gap:
            s = float(e[i] - 0.05 * below_gap)
            vals, vecs = H.eigsh(3, sigma=s)
            ref = ev[torch.argsort((ev - s).abs())[:3]].sort().values
            assert float(ref.min()) > s and int((ev < s).sum()) > 0
            check_pairs(H, vals, vecs, ref, nrm)
            tried += 1
            if tried == 2:
                break
    assert tried >= 1


def test_eigsh_gauss_newton():
    model, loss, X, y = tanh_mlp(6, 4, 8)
    G = hessinv.GaussNewton(model, loss, X, y)
    ev = torch.linalg.eigvalsh(G.to_dense())
    nrm = float(ev.abs().max())
    vals, vecs = G.eigsh(3, which="LA")
    check_pairs(G, vals, vecs, ev[-3:], nrm)
    # the smallest are its null space (multiplicity W - rank): bisection + shift-invert
    vals, vecs = G.eigsh(3, which="SA")
    assert float(vals.abs().max()) <= 1e-8 * nrm
    check_pairs(G, vals, vecs, ev[:3].clamp_min(0) * 0, nrm)
    assert G.eigenvalue_count(-1e-3 * nrm) == 0
    # 8 copies of a 97-fold eigenvalue: ARPACK stalls, block inverse iteration takes over
    vals, vecs = G.eigsh(8, which="SA")
    check_pairs(G, vals, vecs, ev[:8].clamp_min(0) * 0, nrm)
    s = gap_shifts(ev[ev > 1e-8 * nrm], 1)[0]
    assert G.eigenvalue_count(s) == int((ev < s).sum())


def test_bad_input():
    model, loss, X, y = tanh_mlp(3, 3, 2)
    H = hessinv.Hessian(model, loss, X, y)
    with pytest.raises(ValueError, match="k must be"):
        H.eigsh(H.num_params)
    with pytest.raises(ValueError, match="which"):
        H.eigsh(2, which="XX")
    with pytest.raises(ValueError, match="which"):
        H.eigsh(2, sigma=0.1, which="LA")
    with pytest.raises(ValueError, match="edges"):
        H.spectral_histogram([1.0, 0.0])
    with pytest.raises(ValueError, match="sigma"):
        H.eigenvalue_count(float("nan"))
    with pytest.raises(hessinv.SingularHessianError):
        H.eigsh(2, sigma=0.0)  # batch 2: 0 is an eigenvalue (exact null directions)


def test_slq_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    model, loss, X, y = tanh_mlp(6, 4, 4)
    H = hessinv.Hessian(model, loss, X, y)
    ev = dense_eigvals(model, loss, X, y)
    est = spectrum.slq(H, n_probes=4, n_steps=30)
    assert abs(est.weights.sum() - H.num_params) <= 1e-8 * H.num_params
    assert est.nodes.min() >= float(ev[0]) - 1e-8 and est.nodes.max() <= float(ev[-1]) + 1e-8
    nrm = float(ev.abs().max())
    h = H.spectral_histogram(np.linspace(-1.01 * nrm, 1.01 * nrm, 9))
    ax = spectrum.plot_spectrum(h, est, title="test")
    ax.figure.savefig(tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0
