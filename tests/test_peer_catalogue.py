"""The curvlinops and BackPACK model catalogues through ``hessinv.Hessian``, no hand-written Stage.

Every case of ``catalogue_peers.py`` is either exact against an independent
dense reference (``torch.func.hessian`` of the loss as a function of the flat
trainable parameters, built with ``torch.func.functional_call`` on the model
itself, and ``torch.linalg.eigvalsh`` / ``slogdet``), or refused with the named
error. Checked per case: the gradient, ``H @ V``, solves (the default method
and ``method="lifted"``) at a positive damping and at a negative one that
makes ``H + dI`` indefinite, the log-determinant and the inertia there, and,
for the cases with a subset, the same quantities of ``params=``'s Hessian.

Tolerances, all in float64 (``eps = 2.2e-16``), relative to the reference's
own error: the reference and hessinv differentiate the same float64 forward
by different routes, each with an error of a few ``eps`` in ``||H||``, so
``H @ V`` must agree to ``TOL_H = 100 eps ||H|| ||V||``. A solve must meet the
solver contract's normwise backward error ``64 eps`` against hessinv's own
``H``, hence ``64 eps + TOL_H`` against the reference. ``log|det|`` may move by
``W TOL_H / min_i |lambda_i + d|`` (Weyl), and the dampings are chosen in gaps
of the reference spectrum, at least ``1e-3 ||H||`` from every eigenvalue, so
the inertia is decided and must be equal.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from catalogue_peers import PEER_CASES, PeerCase
from torch import nn

import hessinv

EPS = torch.finfo(torch.float64).eps
TOL_H = 100 * EPS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matrices: one thread (several threads on a loaded machine cost 50x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dense_reference(model: nn.Module, loss, X, y, params: list | None = None):
    """``(H, g)`` of ``loss(model(X), y)`` in the selected (default: trainable) parameters."""
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    else:
        ids = {id(p): n for n, p in named.items()}
        names = [ids[id(p)] for p in params]
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    x0 = torch.cat([named[n].detach().reshape(-1) for n in names])

    def f(flat: torch.Tensor) -> torch.Tensor:
        chunks = flat.split(sizes)
        ps = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return loss(torch.func.functional_call(model, ps, (X,)), y)

    return torch.func.hessian(f)(x0).detach(), torch.func.grad(f)(x0).detach()


def gap_dampings(lam: torch.Tensor) -> tuple[float, float]:
    """A positive damping, and ``-`` the midpoint of the widest gap away from 0 (indefinite)."""
    nrm = float(lam.abs().max())
    if nrm == 0.0:  # H = 0 (e.g. every ReLU inactive): H + dI = dI
        return 1.0, -1.0
    d_pos = 1e-2 * nrm
    mids = (lam[1:] + lam[:-1]) / 2
    gaps = lam[1:] - lam[:-1]
    ok = mids.abs() > 1e-2 * nrm  # shift into the spectrum, not next to its zero cluster
    gaps = torch.where(ok, gaps, torch.zeros_like(gaps))
    i = int(gaps.argmax())
    d_neg = -float(mids[i]) if gaps[i] > 2e-3 * nrm else d_pos
    return d_pos, d_neg


def inertia_ref(lam: torch.Tensor, d: float) -> tuple[int, int, int]:
    mu = lam + d
    return int((mu > 0).sum()), int((mu < 0).sum()), int((mu == 0).sum())


def backward_error(A: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> float:
    r = A @ x - g
    return float(r.norm() / (torch.linalg.matrix_norm(A, 2) * x.norm() + g.norm()))


def check_against_reference(H, Href: torch.Tensor, gref: torch.Tensor) -> dict:
    """Every exact quantity of ``H`` against the dense reference; returns what was done."""
    W = Href.shape[0]
    assert H.shape == (W, W)
    nrm = float(torch.linalg.matrix_norm(Href.detach(), 2))
    g = H.gradient()
    assert float((g - gref).norm()) <= TOL_H * max(float(gref.norm()), nrm), "gradient"
    V = torch.randn(W, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert float((H @ V - Href @ V).norm()) <= TOL_H * nrm * float(V.norm()), "H @ V"
    lam = torch.linalg.eigvalsh(Href)
    done = {"lifted_refused": []}
    if nrm == 0.0:  # H = 0 exactly: no damping, no solve
        assert float(H.to_dense().abs().max()) == 0.0
        with pytest.raises(hessinv.SingularHessianError, match="pass damping > 0"):
            H.solve(g + 1.0, damping=0.0)
    I = torch.eye(W, dtype=torch.float64)  # noqa: E741
    for d in gap_dampings(lam):
        A = Href + d * I
        dist = float((lam + d).abs().min())
        b = g + V[:, 0]  # never zero, also where every ReLU is inactive
        for method in ("auto", "lifted"):
            try:
                x = H.solve(b, damping=d, method=method)
                assert backward_error(A, x, b) <= 64 * EPS + TOL_H, (method, d, "solve")
                sign, logabs = H.logdet(d, method=method)
                sref, lref = torch.linalg.slogdet(A)
                assert float(sign) == float(sref), (method, d, "logdet sign")
                assert abs(float(logabs) - float(lref)) <= W * TOL_H * nrm / dist + 1e-13, (
                    method,
                    d,
                )
                inertia = H.inertia(d, method=method)
                assert tuple(inertia) == inertia_ref(lam, d), (method, d, "inertia", tuple(inertia))
            except hessinv.SingularHessianError as e:  # the lifted route may refuse, clearly
                assert method == "lifted", (method, d, str(e))
                done["lifted_refused"].append((d, type(e).__name__))
    return done


def _param(c: PeerCase):
    if c.known_bug is None:
        return pytest.param(c, id=c.name)
    return pytest.param(c, id=c.name, marks=pytest.mark.xfail(strict=True, reason=c.known_bug))


@pytest.mark.parametrize("case", [_param(c) for c in PEER_CASES])
def test_peer_case(case: PeerCase):
    model, loss, X, y = case.make()
    if case.refused is not None:
        exc, msg = case.refused
        with pytest.raises(exc, match=msg):
            hessinv.Hessian(model, loss, X, y)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", hessinv.LiftedPrecisionWarning)
        H = hessinv.Hessian(model, loss, X, y)
    Href, gref = dense_reference(model, loss, X, y)
    done = check_against_reference(H, Href, gref)
    assert not done["lifted_refused"], done  # none of the peers' models needs the dense fallback
    if case.subset is not None:
        sub = case.subset(model)
        Hs = hessinv.Hessian(model, loss, X, y, params=sub)
        Hs_ref, gs_ref = dense_reference(model, loss, X, y, sub)
        assert Hs.shape[0] == sum(p.numel() for p in sub) < H.shape[0]
        done = check_against_reference(Hs, Hs_ref, gs_ref)
        assert not done["lifted_refused"], done


def test_params_out_of_stage_order_refused():
    """curvlinops shuffles ``params``; hessinv refuses an order that interleaves the stages."""
    case = next(c for c in PEER_CASES if c.name == "cl-mlp-mse-mean")
    model, loss, X, y = case.make()
    shuffled = [model[2].weight, model[0].weight, model[0].bias, model[2].bias]
    with pytest.raises(ValueError, match=r"pass params= in the order \['0.weight', '0.bias'"):
        hessinv.Hessian(model, loss, X, y, params=shuffled)
    named = dict(model.named_parameters())  # a dict of named parameters in stage order works
    H = hessinv.Hessian(
        model, loss, X, y, params={"0.weight": named["0.weight"], "2.weight": named["2.weight"]}
    )
    Href, gref = dense_reference(model, loss, X, y, [named["0.weight"], named["2.weight"]])
    check_against_reference(H, Href, gref)


def test_catalogue_covers_both_peers():
    names = [c.name for c in PEER_CASES]
    assert len(names) == len(set(names))
    assert sum(c.source.startswith("curvlinops") for c in PEER_CASES) >= 30
    assert sum(c.source.startswith("backpack") for c in PEER_CASES) >= 80
    assert sum(c.subset is not None for c in PEER_CASES) >= 12


@pytest.mark.parametrize("name", ["cl-unet-mse", "cl-weightshare-ce-mean", "bp-conv-resnet"])
@pytest.mark.parametrize("c", [1e-12, 1e12])
def test_scale_invariance(name: str, c: float):
    """Loss ``c l``: ``H`` scales by ``c``; solves and inertia at ``c d`` are those at ``d``."""
    case = next(x for x in PEER_CASES if x.name == name)
    model, loss, X, y = case.make()
    H = hessinv.Hessian(model, loss, X, y)
    Hc = hessinv.Hessian(model, lambda o, t: c * loss(o, t), X, y)
    Href, _ = dense_reference(model, loss, X, y)
    lam = torch.linalg.eigvalsh(Href)
    W = H.shape[0]
    V = torch.randn(W, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    nrm = float(lam.abs().max())
    assert float((Hc @ V / c - Href @ V).norm()) <= TOL_H * nrm * float(V.norm())
    for d in gap_dampings(lam):
        b = H.gradient() + V[:, 0]
        x = H.solve(b, damping=d)
        xc = Hc.solve(c * b, damping=c * d)
        A = Href + d * torch.eye(W, dtype=torch.float64)
        assert backward_error(A, x, b) <= 64 * EPS + TOL_H
        assert backward_error(A, xc, b) <= 64 * EPS + TOL_H
        assert tuple(Hc.inertia(c * d)) == tuple(H.inertia(d)) == inertia_ref(lam, d)
        (s1, l1), (s2, l2) = H.logdet(d), Hc.logdet(c * d)
        assert s1 == s2 and abs(l2 - W * math.log(c) - l1) <= 1e-9 * max(1.0, abs(l1))


@pytest.mark.parametrize(
    "case", [c for c in PEER_CASES if c.split is not None], ids=lambda c: c.name
)
def test_two_batches_as_a_data_set(case: PeerCase):
    """curvlinops' two batches as ``data=[(X1, y1), (X2, y2)]``: the Hessian of the whole data
    set's loss (mean over all samples for ``"mean"``), against the dense reference of the
    concatenated data; products batch by batch, a solve on the stacked system."""
    model, loss, X, y = case.make()
    k = case.split
    H = hessinv.Hessian(model, loss, data=[(X[:k], y[:k]), (X[k:], y[k:])], progress=False)
    Href, gref = dense_reference(model, loss, X, y)
    W = Href.shape[0]
    nrm = float(torch.linalg.matrix_norm(Href, 2))
    V = torch.randn(W, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert float((H @ V - Href @ V).norm()) <= TOL_H * nrm * float(V.norm())
    assert float((H.gradient() - gref).norm()) <= TOL_H * max(float(gref.norm()), nrm)
    d = gap_dampings(torch.linalg.eigvalsh(Href))[1]
    b = gref + V[:, 0]
    x = H.solve(b, damping=d, method="lifted")
    assert backward_error(Href + d * torch.eye(W, dtype=torch.float64), x, b) <= 64 * EPS + TOL_H
