"""Adversarial tests of the inertia's stage witness (e03f3d0) and the trial's right-hand sides.

After a trusted stage solve, ``LiftedFactorization.inertia()`` is the stage
elimination's Bunch-Kaufman signs checked by one congruence of the lifted ``K``
(``_stage_witness``). Every number here is compared with an independent dense
reference: ``torch.func.hessian`` of the loss in the flat parameters
(``cases.reference_loss_fn``), ``torch.linalg.eigvalsh`` and ``slogdet``.

Defects found (fixed: ``contract.column_norms`` scales each column first): the
normwise backward error that both the trial and the contract's check read was
computed with unscaled 2-norms, which underflow to 0 or
overflow to inf for right-hand sides far from unit scale:

* a first right-hand side of size ~1e-162 (its squares are subnormal, its
  residual's squares underflow to 0) at a damping that makes a stage pivot
  singular: the check and the trial both read a backward error of 0, the
  first solve is returned 5% wrong *without an error*, the stage solver is
  trusted, and every later solve is ~0.3-0.6% wrong (or refused);
* a right-hand side of size ~1e170 on a well-conditioned ``H + dI``: ``||r||``
  and ``||x||`` overflow, the backward error is ``inf / inf = nan``, and the
  solve is refused as "too ill-conditioned" by every method.

The attacks on the witness itself held (plain tests).
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import dense_hessian, last_stage_pivot_mu
from cases import tanh_net as net

import hessinv
from hessinv.riccati_solve import _bk_signature
from hessinv.solvers.contract import solve_tolerance
from hessinv.spectrum import eigenvalue_count

DT = torch.float64


def backward_error(a: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> float:
    """Worst column's ``||A x - g|| / (||A||_2 ||x|| + ||g||)``, computed at unit scale."""
    if x.dim() == 1:
        x, g = x[:, None], g[:, None]
    s = g.abs().amax(dim=0).clamp_min(1e-300)  # per column: no under/overflow in the norms
    x, g = x / s, g / s
    r = torch.linalg.vector_norm(a @ x - g, dim=0)
    den = torch.linalg.matrix_norm(a, 2) * torch.linalg.vector_norm(x, dim=0)
    return float((r / (den + torch.linalg.vector_norm(g, dim=0))).max())


def ref_inertia(a: torch.Tensor) -> tuple[int, int, int]:
    """Signs of ``eigvalsh(a)`` with the library's zero band ``W eps ||A||``."""
    ev = torch.linalg.eigvalsh(a)
    t = a.shape[0] * torch.finfo(a.dtype).eps * float(ev.abs().max())
    return int((ev > t).sum()), int((ev < -t).sum()), int((ev.abs() <= t).sum())


def rhs(w: int, k: int = 1, seed: int = 1, dtype: torch.dtype = DT) -> torch.Tensor:
    return torch.randn(w, k, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def case():
    """A 4-stage tanh net, its dense Hessian, ``mu``: the last stage pivot is singular at -mu."""
    model, loss, X, y = net(4, 3, 4, 1.5)
    mu = last_stage_pivot_mu(model, loss, X, y)
    return model, loss, X, y, dense_hessian(model, loss, X, y), mu


def _shifted(h: torch.Tensor, d: float) -> torch.Tensor:
    return h + d * torch.eye(h.shape[0], dtype=h.dtype)


# -- defects -------------------------------------------------------------------------------


def test_tiny_first_rhs_is_solved_exactly(case) -> None:  # noqa: ANN001
    model, loss, X, y, h, mu = case
    a = _shifted(h, -mu)  # well conditioned; the last stage pivot is singular
    H = hessinv.Hessian(model, loss, X, y)
    g = rhs(h.shape[0], k=3)[:, :1] * 1e-162
    x = H.solve(g, -mu, method="lifted")  # check=True: exact or an error
    assert backward_error(a, x, g) <= 64 * torch.finfo(DT).eps  # measured: 4.7e-2


def test_tiny_first_rhs_then_later_solve_is_exact(case) -> None:  # noqa: ANN001
    model, loss, X, y, h, mu = case
    a = _shifted(h, -mu)
    H = hessinv.Hessian(model, loss, X, y)
    H.solve(rhs(h.shape[0], k=3)[:, :1] * 1e-162, -mu, method="lifted", check=False)
    g = rhs(h.shape[0], k=3, seed=4)
    x = H.solve(g, -mu, method="lifted", check=False)
    assert backward_error(a, x, g) <= 64 * torch.finfo(DT).eps  # measured: 6.2e-3


@pytest.mark.parametrize("method", ["lifted", "dense"])
def test_huge_rhs_is_solved_not_refused(case, method: str) -> None:  # noqa: ANN001
    model, loss, X, y, h, _ = case
    a = _shifted(h, 1.0)  # sigma_min(A) / ||A|| ~ 0.1
    H = hessinv.Hessian(model, loss, X, y)
    g = rhs(h.shape[0]) * 1e170
    x = H.solve(g, 1.0, method=method)
    assert backward_error(a, x, g) <= 64 * torch.finfo(DT).eps


# -- attacks that held: the witness ----------------------------------------------------------


def _trusted(H, d: float, w: int, dtype: torch.dtype = DT):  # noqa: ANN001, ANN202
    fac = H.factor(d, method="lifted")
    fac.solve(rhs(w, dtype=dtype, seed=3))
    return fac


def test_witness_eigenvalues_within_1e_11_of_zero(case) -> None:  # noqa: ANN001
    """``d = -lambda_i(H) +- 1e-11 ||H||``: counts, verified flag, logdet sign, PD all exact."""
    model, loss, X, y, h, _ = case
    ev = torch.linalg.eigvalsh(h)
    nrm = float(ev.abs().max())
    H = hessinv.Hessian(model, loss, X, y)
    used = 0
    for i in (0, 9, 45, len(ev) - 1):
        for rel in (1e-11, -1e-11):
            d = -float(ev[i]) + rel * nrm
            H.clear_cache()
            a = _shifted(h, d)
            fac = _trusted(H, d, h.shape[0])
            inert = fac.inertia()
            assert tuple(inert) == ref_inertia(a) and inert.verified
            used += "stage elimination" in inert.how
            s, la = fac.logdet()
            s_ref, la_ref = torch.linalg.slogdet(a)
            assert s == float(s_ref)
            cond = float(torch.linalg.cond(a))
            assert abs(la - float(la_ref)) <= 1e-13 * cond  # both within eps * cond
            assert fac.is_positive_definite() is (inert.negative == 0)
    assert used >= 4  # the witness path was taken


@pytest.mark.parametrize("mult", [3.0, -3.0, 20.0, -20.0])
def test_witness_dropped_directions_at_damping_just_above_zero_band(case, mult: float) -> None:  # noqa: ANN001
    """``|d|`` a few ``W eps ||A||``: the 8 dropped eigenvalues ``d`` count as signed, not zero."""
    model, loss, X, y, h, _ = case
    w = h.shape[0]
    ev = torch.linalg.eigvalsh(h)
    d = mult * w * torch.finfo(DT).eps * float(ev.abs().max())
    a = _shifted(h, d)
    H = hessinv.Hessian(model, loss, X, y)
    fac = _trusted(H, d, w)
    assert fac.system.n_dropped > 0
    ref = ref_inertia(a)
    inert = fac.inertia()
    assert tuple(inert) == ref
    if ref[2] == 0:
        s, _ = fac.logdet()
        assert s == float(torch.linalg.slogdet(a)[0])


@pytest.mark.parametrize("c", [1e-12, 1e12])
def test_witness_loss_scale(c: float) -> None:
    model, loss, X, y = net(3, 4, 5, 2.5, seed=1, scale=c)
    h = dense_hessian(model, loss, X, y)
    ev = torch.linalg.eigvalsh(h)
    nrm = float(ev.abs().max())
    H = hessinv.Hessian(model, loss, X, y)
    for i in (3, 30):
        for rel in (1e-10, -1e-10):
            d = -float(ev[i]) + rel * nrm
            H.clear_cache()
            fac = _trusted(H, d, h.shape[0])
            inert = fac.inertia()
            assert tuple(inert) == ref_inertia(_shifted(h, d)) and inert.verified


def test_witness_float32() -> None:
    model, loss, X, y = net(4, 3, 4, 1.5, seed=2)
    h = dense_hessian(model, loss, X, y)
    ev = torch.linalg.eigvalsh(h)
    nrm = float(ev.abs().max())
    w = h.shape[0]
    model32 = model.float()
    H = hessinv.Hessian(model32, loss, X.float(), y.float())
    h32 = dense_hessian(model32.double(), loss, X, y)  # the float32 parameters' exact H
    model32.float()
    ev32 = torch.linalg.eigvalsh(h32)
    t = w * torch.finfo(torch.float32).eps * nrm
    for i in (5, 40):
        for rel in (1e-3, -1e-3):
            d = -float(ev32[i]) + rel * nrm
            H.clear_cache()
            fac = _trusted(H, d, w, dtype=torch.float32)
            s = ev32 + d
            assert float(s.abs().min()) > 10 * t
            inert = fac.inertia()
            assert tuple(inert) == (int((s > 0).sum()), int((s < 0).sum()), 0)


def test_witness_zero_damping_full_rank_stages() -> None:
    """``d = 0`` with nothing dropped (width 2, batch 6): the stage elimination at zero shift."""
    model, loss, X, y = net(2, 6, 5, 3.0, seed=2)
    h = dense_hessian(model, loss, X, y)
    H = hessinv.Hessian(model, loss, X, y)
    fac = _trusted(H, 0.0, h.shape[0])
    assert fac.system.n_dropped == 0 and fac.solver == "stages"
    inert = fac.inertia()
    assert tuple(inert) == ref_inertia(h) and inert.verified
    assert "stage elimination" in inert.how  # ||H|| / lambda_min ~ 1.5e9 here
    assert H.inertia(0.0, method="lifted") == inert
    assert eigenvalue_count(H, 0.0) == inert.negative


def test_eigenvalue_count_after_trusted_solve(case) -> None:  # noqa: ANN001
    """A cached, trusted factorization at ``-sigma`` serves the spectrum count."""
    model, loss, X, y, h, _ = case
    ev = torch.linalg.eigvalsh(h)
    nrm = float(ev.abs().max())
    H = hessinv.Hessian(model, loss, X, y)
    sigma = float(ev[20]) + 1e-11 * nrm
    fac = _trusted(H, -sigma, h.shape[0])
    assert fac.solver == "stages"
    assert eigenvalue_count(H, sigma) == int((ev < sigma).sum()) == 21
    assert H.inertia(-sigma, method="lifted") == fac.inertia()


# -- attacks that held: _bk_signature ----------------------------------------------------------


def _eig_signature(a: torch.Tensor) -> list[float]:
    ev = torch.linalg.eigvalsh(a)
    return [float((ev > 0).sum()), float((ev < 0).sum()), 0.0, float(ev.abs().log().sum())]


@pytest.mark.parametrize("kind", ["random", "zero_diagonal", "tiny_diagonal", "antidiagonal"])
def test_bk_signature_nonsingular(kind: str) -> None:
    """2x2 pivots, runs of them, and permuted 2x2 blocks: counts and log|det| as eigvalsh."""
    gen = torch.Generator().manual_seed(0)
    for k in (1, 2, 3, 4, 5, 8):
        for _ in range(10):
            a = torch.randn(4, k, k, dtype=DT, generator=gen)
            a = a + a.mT
            if kind == "zero_diagonal":
                a.diagonal(dim1=-2, dim2=-1).zero_()
            elif kind == "tiny_diagonal":
                a.diagonal(dim1=-2, dim2=-1).mul_(1e-8)
            elif kind == "antidiagonal":
                a = torch.zeros(4, k, k, dtype=DT)
                for i in range(k // 2):
                    v = torch.randn(4, dtype=DT, generator=gen)
                    a[:, 2 * i, 2 * i + 1] = a[:, 2 * i + 1, 2 * i] = v
                if k % 2:
                    a[:, -1, -1] = -1.0
                p = torch.randperm(k, generator=gen)
                a = a[:, p][:, :, p]
            if any(float(torch.linalg.svdvals(m)[-1]) < 1e-10 for m in a):
                continue
            got = _bk_signature(a).tolist()
            want = [sum(c) for c in zip(*(_eig_signature(m) for m in a), strict=True)]
            assert got[:3] == want[:3]
            assert abs(got[3] - want[3]) <= 1e-10 * max(1.0, abs(want[3]))


@pytest.mark.parametrize("v", [1e-170, 1e200])
def test_bk_signature_extreme_2x2_fails_safe(v: float) -> None:
    """``x z - y^2`` under/overflows for ``|y|`` beyond 1e+-154: reported as zero or infinite
    (the witness then declines and the block LU decides), never as wrong finite signs."""
    a = torch.tensor([[[0.0, v], [v, 0.0]]], dtype=DT)
    pos, neg, zero, la = _bk_signature(a).tolist()
    assert zero > 0 or not math.isfinite(la)


# -- attacks that held: right-hand sides of the trial -------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_rhs_refused(case, bad: float) -> None:  # noqa: ANN001
    model, loss, X, y, h, mu = case
    H = hessinv.Hessian(model, loss, X, y)
    g = rhs(h.shape[0], k=3)
    g[3, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        H.solve(g, -mu, method="lifted")


def test_zero_column_among_columns_at_singular_stage_pivot(case) -> None:  # noqa: ANN001
    model, loss, X, y, h, mu = case
    a = _shifted(h, -mu)
    H = hessinv.Hessian(model, loss, X, y)
    g = torch.cat([torch.zeros(h.shape[0], 1, dtype=DT), rhs(h.shape[0], k=2)], dim=1)
    x = H.solve(g, -mu, method="lifted")
    assert float(x[:, 0].abs().max()) == 0.0
    assert backward_error(a, x[:, 1:], g[:, 1:]) <= solve_tolerance(DT)
    assert H.factor(-mu, method="lifted").solver == "lu"
    g2 = rhs(h.shape[0], k=2, seed=9)
    assert backward_error(a, H.solve(g2, -mu, method="lifted", check=False), g2) <= solve_tolerance(
        DT
    )


def test_tiny_kept_part_first_rhs_at_singular_stage_pivot(case) -> None:  # noqa: ANN001
    """A null direction of ``H`` plus ``1e-14`` of a random vector: judged on the kept part."""
    model, loss, X, y, h, mu = case
    a = _shifted(h, -mu)
    null = torch.zeros(h.shape[0], dtype=DT)
    null[:20] = torch.linalg.svd(h[:, :20])[2][-1]
    H = hessinv.Hessian(model, loss, X, y)
    g = (null + 1e-14 * rhs(h.shape[0])[:, 0])[:, None]
    assert backward_error(a, H.solve(g, -mu, method="lifted"), g) <= solve_tolerance(DT)
    g2 = rhs(h.shape[0], k=2, seed=9)
    assert backward_error(a, H.solve(g2, -mu, method="lifted", check=False), g2) <= solve_tolerance(
        DT
    )
