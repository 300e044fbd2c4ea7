"""Adversarial tests of the probe that settles the stage solver's trust before any solve (682abc0).

``LiftedFactorization._settle_trust`` decides an undecided stage elimination by
one random kept probe (``"exact"``, ``"refined"`` or ``"reject"``) when an
inertia, a log-determinant, a positive-definiteness verdict, a zero count, a
``sigma_min`` estimate or ``singular`` is asked for before any solve. Each query
here is the *first* call on a fresh factorization, at dampings chosen to break
the stage elimination: ``d = -mu`` for an eigenvalue ``mu`` of a stage's
projected ``Txx`` (a singular stage pivot, ``H + dI`` regular), ``d = -mu (1 +-
delta)`` (a nearly singular pivot: the ``"refined"`` verdict), and ``d =
-lambda_i(H) (+- a few eps ||H||)`` (``H + dI`` numerically singular: the zero
count must be positive). Float32 and loss scales ``1e-12`` / ``1e12`` too.

Every answer is compared with an independent dense reference:
``torch.func.hessian`` of the loss in the flat parameters
(``cases.dense_hessian``), ``torch.linalg.eigvalsh`` and ``slogdet``, with the
library's zero band ``t = W eps ||A||``. Eigenvalues within the reference's own
error ``delta = 10 eps ||A||`` of ``+-t`` (or of 0, for signs) make the count
ambiguous; such cases are skipped, not loosened.

No defect was found: every attack held (plain tests). A spy checks that the
cases reach all three probe verdicts, so the tests exercise the new code.
"""

from __future__ import annotations

import collections
import copy
import math
import warnings

import pytest
import torch
from cases import dense_hessian, tanh_net

import hessinv
from hessinv.solvers.lifted import LiftedFactorization
from hessinv.spectrum import eigenvalue_count

DT = torch.float64
QUERIES = ("inertia", "zero", "sigma", "logdet", "pd", "singular")


def _reference(a: torch.Tensor, dtype: torch.dtype) -> dict:
    """Inertia, zero count, ``sigma_min``, ``slogdet`` of ``a`` (float64) at ``dtype``'s band."""
    ev = torch.linalg.eigvalsh(a)
    nrm = float(ev.abs().max())
    eps = torch.finfo(dtype).eps
    t = a.shape[0] * eps * nrm
    delta = 10 * eps * nrm  # the reference's own error (and the operator's rounding)
    s, la = torch.linalg.slogdet(a)
    return {
        "ev": ev,
        "t": t,
        "delta": delta,
        "inertia": (int((ev > t).sum()), int((ev < -t).sum()), int((ev.abs() <= t).sum())),
        "ambiguous": bool(((ev.abs() - t).abs() < delta).any()),
        "sigma": float(ev.abs().min()),
        "slogdet": (float(s), float(la)),
    }


def _first_query(model, loss, X, y, d: float, q: str):  # noqa: ANN001, ANN202
    """``q`` asked first of a fresh lifted factorization of ``H + dI`` (no solve before)."""
    H = hessinv.Hessian(model, loss, X, y)
    fac = LiftedFactorization(H, d)
    assert fac._trust is None or fac.stage_solver is None  # nothing settled yet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if q == "inertia":
            return tuple(fac.inertia())
        if q == "zero":
            return fac.zero_count()
        if q == "sigma":
            return fac.sigma_min_estimate()
        if q == "logdet":
            return fac.logdet()
        if q == "pd":
            return fac.is_positive_definite()
        return fac.singular


def _check_all(model, loss, X, y, h: torch.Tensor, d: float, dtype: torch.dtype = DT) -> None:  # noqa: ANN001
    a = h + d * torch.eye(h.shape[0], dtype=h.dtype)
    ref = _reference(a, dtype)
    pos, neg, zero = ref["inertia"]
    got = {q: _first_query(model, loss, X, y, d, q) for q in QUERIES}
    ctx = f"d={d!r}: got {got}, reference {ref['inertia']} sigma {ref['sigma']:.3e}"
    sigma = got["sigma"]
    if ref["sigma"] > 10 * ref["t"]:  # an estimate from above of a regular A's sigma_min
        assert sigma >= ref["sigma"] - ref["delta"], ctx
    if zero and not ref["ambiguous"]:  # a numerically singular A: no escape by the estimate
        assert sigma <= 10 * ref["t"], ctx
    if ref["ambiguous"]:
        return
    assert got["inertia"] == ref["inertia"], ctx
    assert got["zero"] == zero, ctx
    assert got["singular"] == (zero > 0), ctx
    assert got["pd"] in (None, neg == 0 and zero == 0), ctx
    s, la = got["logdet"]
    if zero:
        assert (s, la) == (0.0, -math.inf), ctx
    else:
        s_ref, la_ref = ref["slogdet"]
        # first order: each eigenvalue is known to delta
        tol = 1e-9 * max(1.0, abs(la_ref)) + float((ref["delta"] / ref["ev"].abs()).sum())
        assert s == s_ref and abs(la - la_ref) <= tol, ctx
    assert pos + neg + zero == h.shape[0]


@pytest.fixture()
def verdicts(monkeypatch):  # noqa: ANN001, ANN201
    """Counts the probe's verdicts (a spy: the verdicts themselves are unchanged)."""
    seen: collections.Counter = collections.Counter()
    orig = LiftedFactorization._probe_verdict

    def spy(self, norm: float) -> str:  # noqa: ANN001
        v = orig(self, norm)
        seen[v] += 1
        return v

    monkeypatch.setattr(LiftedFactorization, "_probe_verdict", spy)
    return seen


def _stage_mus(model, loss, X, y) -> list[list[float]]:  # noqa: ANN001
    H = hessinv.Hessian(model, loss, X, y)
    p0 = LiftedFactorization(H, 0.0, stage_solver=False)
    return [torch.linalg.eigvalsh(p.txx.to(DT)).tolist() for p in p0.system.projections]


# -- attacks that held ----------------------------------------------------------------------


@pytest.mark.parametrize("c", [1.0, 1e-12, 1e12])
def test_singular_and_nearly_singular_stage_pivots_before_any_solve(c: float, verdicts) -> None:  # noqa: ANN001
    """``d = -mu (1 + off)``, ``mu`` an extreme eigenvalue of each stage's ``Txx``."""
    model, loss, X, y = tanh_net(3, 2, 4, 1.5, scale=c)
    h = dense_hessian(model, loss, X, y)
    for mus in _stage_mus(model, loss, X, y):
        for mu in (mus[0], mus[-1]):
            for off in (0.0, -1e-7) if mu == mus[-1] else (0.0,):
                _check_all(model, loss, X, y, h, -mu * (1 + off))
    assert set(verdicts) == {"exact", "refined", "reject"}, verdicts


@pytest.mark.parametrize("c", [1.0, 1e-12, 1e12])
def test_numerically_singular_damping_before_any_solve(c: float) -> None:
    """``d = -lambda_i(H) + off ||H||``: a zero count > 0 inside the band, none outside."""
    model, loss, X, y = tanh_net(3, 2, 4, 1.5, scale=c)
    h = dense_hessian(model, loss, X, y)
    ev = torch.linalg.eigvalsh(h)
    nrm = float(ev.abs().max())
    for i in (0, 1, len(ev) // 2, len(ev) - 2, len(ev) - 1):
        for off in (0.0, 1e-15, -1e-13, 1e-12):
            d = -float(ev[i]) + off * nrm
            if d != 0.0:
                _check_all(model, loss, X, y, h, d)


def test_exactly_singular_damping_zero_count_positive() -> None:
    """At ``d = -lambda_i(H)`` every first query reports the singularity."""
    model, loss, X, y = tanh_net(4, 3, 4, 1.5)
    h = dense_hessian(model, loss, X, y)
    ev = torch.linalg.eigvalsh(h)
    for i in (0, len(ev) // 3, len(ev) - 1):
        d = -float(ev[i])
        assert _first_query(model, loss, X, y, d, "zero") >= 1
        assert _first_query(model, loss, X, y, d, "singular") is True
        assert _first_query(model, loss, X, y, d, "logdet") == (0.0, -math.inf)
        assert _first_query(model, loss, X, y, d, "inertia")[2] >= 1
        assert _first_query(model, loss, X, y, d, "pd") is not True


def test_float32_stage_pivots_and_singular_dampings(verdicts) -> None:  # noqa: ANN001
    """Float32 operator, float64 reference of the same (float32) parameters, float32's band."""
    model, loss, X, y = tanh_net(3, 2, 4, 1.5)
    m32, X32, y32 = copy.deepcopy(model).float(), X.float(), y.float()
    h = dense_hessian(copy.deepcopy(m32).double(), loss, X32.double(), y32.double())
    ev = torch.linalg.eigvalsh(h)
    nrm = float(ev.abs().max())
    ds = [
        -mu * (1 + off)
        for mus in _stage_mus(m32, loss, X32, y32)
        for mu in (mus[0], mus[-1])
        for off in (0.0, 1e-4)
    ]
    ds += [-float(ev[i]) + off * nrm for i in (0, len(ev) - 1) for off in (0.0, 1e-7)]
    for d in ds:
        if d != 0.0:
            _check_all(m32, loss, X32, y32, h, d, dtype=torch.float32)
    assert {"exact", "reject"} <= set(verdicts), verdicts


def test_eigenvalue_count_at_stage_pivot_shifts() -> None:
    """``hessinv.spectrum.eigenvalue_count`` (auto picks lifted) at singular stage pivots.

    The count is of the eigenvalues below ``sigma`` by more than working
    precision: those within ``W eps ||H - sigma I||`` of ``sigma`` are its zero
    count (one of the stage pivots is ``~1e-16``, at a cluster of a dozen null
    eigenvalues of ``H`` spread over ``+-1.4e-16``). Where an eigenvalue sits
    within the reference's own error ``10 eps ||H||`` of that band's edge,
    either side is correct.
    """
    model, loss, X, y = tanh_net(4, 3, 4, 1.5)
    h = dense_hessian(model, loss, X, y)
    ev = torch.linalg.eigvalsh(h)
    eps = torch.finfo(DT).eps
    delta = 10 * eps * float(ev.abs().max())
    H = hessinv.Hessian(model, loss, X, y)
    assert H.factor(0.3).method == "lifted"
    for mus in _stage_mus(model, loss, X, y):
        for mu in (mus[0], mus[-1]):
            sigma = float(mu)  # H - sigma I = H + dI at d = -mu
            t = len(ev) * eps * float((ev - sigma).abs().max())
            lo = int((ev < sigma - t - delta).sum())
            hi = int((ev < sigma - t + delta).sum())
            H.clear_cache()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert lo <= eigenvalue_count(H, sigma) <= hi, (sigma, lo, hi)
