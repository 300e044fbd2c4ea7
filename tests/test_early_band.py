"""The first solve's inverse iteration ends early when it already excludes the zero band.

:func:`hessinv.solvers.estimates.excludes_band` rests on ``e_j <= sigma_min
|c_1|^{-1/j}`` (``e_j`` the estimate after ``j`` steps, ``c_1`` the start's
component along the eigenvector of the smallest ``|lambda|``): checked here on
random symmetric matrices, then the decision on the solver: early far from
the band, the full five steps close to it, the same at every loss scale.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import DT, reference_loss_fn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hessinv
from hessinv.solvers.estimates import (
    INVERSE_STEPS,
    drive,
    excludes_band,
    gaussian,
    inverse_iteration_steps,
)
from hessinv.solvers.lifted import LiftedFactorization

EPS = torch.finfo(DT).eps


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 14),
    seed=st.integers(0, 10_000),
    log_small=st.floats(-14, 0),
    negative=st.booleans(),
)
def test_estimate_after_j_steps_is_within_the_start_s_share(n, seed, log_small, negative):
    """``sigma_min <= e_j <= sigma_min |c_1|^{-1/j}`` for every step ``j`` (indefinite too)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    lam = torch.empty(n, dtype=DT).uniform_(0.5, 3.0, generator=g)
    lam *= torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(DT)
    lam[0] = (-1.0 if negative else 1.0) * 10.0**log_small
    a_inv = (q / lam) @ q.T  # A^{-1} exactly, A = Q diag(lam) Q^T
    record: list[tuple[tuple[float, ...], int]] = []
    est = drive(
        inverse_iteration_steps(n, DT, torch.device("cpu"), record=record, columns=2),
        lambda y: a_inv @ y,
    )
    sigma = float(lam.abs().min())
    i = int(lam.abs().argmin())
    starts = gaussian(n, 2, DT, torch.device("cpu"), 1)
    c1 = (q[:, i] @ (starts / torch.linalg.vector_norm(starts, dim=0))).abs().tolist()
    assert [j for _, j in record] == list(range(1, INVERSE_STEPS + 1))
    assert est == min(record[-1][0])
    for es, j in record:  # each start on its own obeys the bound
        for e, c in zip(es, c1, strict=True):
            assert e >= sigma * (1 - 1e-9)
            assert e <= sigma * c ** (-1.0 / j) * (1 + 1e-9)


def test_excludes_band_is_the_five_step_rule_at_five_steps():
    t = 1e-7
    assert excludes_band(10.01 * t, 5, t) and not excludes_band(9.99 * t, 5, t)
    assert excludes_band(46.5 * t, 3, t) and not excludes_band(46.3 * t, 3, t)
    assert not excludes_band(math.inf, 0, t)  # no step: nothing is known


@pytest.mark.parametrize("size", [10, 34561, 10**8])
def test_two_starts_have_the_confidence_of_one(size: int) -> None:
    """``m`` starts: ``prod_i (t / e_i)^j <= 10^-5 (2 W / pi)^{-(m-1)/2}`` (module doc)."""
    t, w = 1e-7, 2.0 * size / math.pi
    for j in (1, 2, 3, 5):
        edge = t * (10.0**5 * w**0.5) ** (1.0 / (2 * j))  # both starts at the same estimate
        assert excludes_band((1.001 * edge, 1.001 * edge), j, t, size)
        assert not excludes_band((0.999 * edge, 0.999 * edge), j, t, size)
        # a start without evidence (at the band) only weakens the other's
        assert not excludes_band((t, 1e30 * t), j, t, size) or j * 30 >= 5 + 0.5 * math.log10(w)
    with pytest.raises(ValueError, match="size"):
        excludes_band((1.0, 1.0), 3, t)
    assert excludes_band((11 * t,), 5, t, size) == excludes_band(11 * t, 5, t)


def _net(c: float, batch: int = 6):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 2))
    model = model.to(DT)
    gen = torch.Generator().manual_seed(1)
    X, y = (
        torch.randn(batch, 3, generator=gen, dtype=DT),
        torch.randn(batch, 2, generator=gen, dtype=DT),
    )

    def loss(o, t):
        return c * ((o - t) ** 2).sum()

    f, x0 = reference_loss_fn(model, lambda o, t: ((o - t) ** 2).sum(), X, y)
    return hessinv.Hessian(model, loss, X, y), torch.func.hessian(f)(x0)


def _count_standalone(monkeypatch):  # noqa: ANN001, ANN202
    calls = []
    real = LiftedFactorization._apply_for_estimates
    monkeypatch.setattr(
        LiftedFactorization,
        "_apply_for_estimates",
        lambda self, v: calls.append(v.shape[1]) or real(self, v),
    )
    return calls


@pytest.mark.parametrize("c", [1e-12, 1.0, 1e12])
def test_far_from_the_band_the_iteration_ends_with_the_solve(monkeypatch, c):
    """Indefinite ``H + dI`` with ``sigma_min`` many thousand ``t``: no step on its own,
    no zero counted, and the full estimate on request is the five-step one."""
    H, A = _net(c)
    ev = torch.linalg.eigvalsh(A)
    gaps = ev[1:] - ev[:-1]
    i = int(gaps.argmax())  # the widest gap between two eigenvalues: H + dI indefinite
    d = -0.5 * float(ev[i] + ev[i + 1])
    sigma = float((ev + d).abs().min())
    t = H.num_params * EPS * float((ev + d).abs().max())
    assert sigma > 1e4 * t
    calls = _count_standalone(monkeypatch)
    fac = H.factor(c * d, "lifted")
    g = torch.ones(H.num_params, dtype=DT)
    x = fac.solve(g)
    assert calls == []  # the steps that rode along were enough
    assert fac._sigma_min is None
    est, j = fac._sigma_early
    assert j < INVERSE_STEPS and min(est) >= c * sigma * (1 - 1e-8)
    assert fac.zero_count() == 0 and not fac.singular
    full = fac.sigma_min_estimate()  # the whole iteration (the same starts), on request
    assert len(calls) == INVERSE_STEPS and c * sigma * (1 - 1e-8) <= full <= min(est) * (1 + 1e-12)
    r = (A + d * torch.eye(H.num_params, dtype=DT)) @ (c * x) - g
    assert float(torch.linalg.vector_norm(r)) <= 1e-8 * float(torch.linalg.vector_norm(g))


@pytest.mark.parametrize("c", [1e-12, 1.0, 1e12])
def test_next_to_the_band_the_full_iteration_runs(monkeypatch, c):
    """``sigma_min = 3 t``: three steps cannot exclude the band, the five-step rule decides
    (and the band count finds no zero, as ``eigvalsh`` says)."""
    H, A = _net(c)
    ev = torch.linalg.eigvalsh(A)
    lam = float(ev[ev < 0].max())
    t = H.num_params * EPS * float(ev.abs().max())  # ~ t of A, which ||A|| barely moves
    d = -lam + 3 * t
    ev_d = ev + d
    t_d = H.num_params * EPS * float(ev_d.abs().max())
    assert t_d < float(ev_d.abs().min()) < 10 * t_d
    calls = _count_standalone(monkeypatch)
    fac = H.factor(c * d, "lifted")
    fac.solve(torch.ones(H.num_params, dtype=DT))
    assert fac._sigma_early is None and fac._sigma_min is not None
    assert fac.zero_count() == 0
    assert len(calls) <= INVERSE_STEPS


def test_a_second_factorization_of_the_operator_also_ends_early(monkeypatch):
    """Its norm is known from the first (no Lanczos rides along): the early end still
    applies, on the same rule, and its decision agrees with ``eigvalsh``."""
    H, A = _net(1.0)
    ev = torch.linalg.eigvalsh(A)
    gaps = ev[1:] - ev[:-1]
    i = int(gaps.argmax())
    d = -0.5 * float(ev[i] + ev[i + 1])
    g = torch.ones(H.num_params, dtype=DT)
    H.factor(d + 1.0, "lifted").solve(g)  # stores the norm estimate
    assert H._bounds is not None
    calls = _count_standalone(monkeypatch)
    fac = H.factor(d, "lifted")
    fac.solve(g)
    assert calls == [] and fac._sigma_min is None
    est, j = fac._sigma_early
    assert j < INVERSE_STEPS and excludes_band(est, j, fac.zero_threshold(), H.num_params)
    assert fac.zero_count() == 0 and float((ev + d).abs().min()) > 1e4 * fac.zero_threshold()
