"""``||H + dI||`` when the damping cancels the spectrum of ``H`` to round-off.

Checks ``hessinv.solvers.contract.shifted_norm``. The norm estimate
``max(|theta_max + d|, |theta_min + d|)`` from Lanczos on ``H``
has no correct digit when ``d`` cancels a narrow Ritz range: for ``H = lambda I``
and ``d = -theta`` it read ``0`` while ``H + dI`` was one ulp times ``I``, and the
lifted inertia then called every eigenvalue zero and marked it verified. Here
``H = 2 (sum_n x_n^2) I_k`` exactly (one ``Linear(1, k, bias=False)`` stage, a
summed squared error, inputs that are multiples of ``1/8``, so the sum is exact
in float64), and ``H + dI = (lambda + d) I`` for ``d`` within a few ulps of
``-lambda`` is exact too (Sterbenz): the reference is that closed form, not the
code under test.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hessinv
from hessinv.errors import LiftedPrecisionError, SingularHessianError
from hessinv.solvers.contract import shifted_norm

DT = torch.float64
EPS = torch.finfo(DT).eps


def _mse_sum(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).sum()


def _scalar_net(xs: list[float], k: int, scale: float):  # noqa: ANN202
    """``(H, lambda)``: the Hessian of ``scale * sum ||W x_n||^2``, ``H = lambda I_k``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, k, bias=False)).to(DT)
    X = torch.tensor([[x] for x in xs], dtype=DT)  # noqa: N806
    y = torch.zeros(len(xs), k, dtype=DT)
    lam = scale * 2.0 * math.fsum(x * x for x in xs)  # exact: dyadic x, power-of-two scale

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return scale * _mse_sum(out, target)

    return hessinv.Hessian(model, loss, X, y), lam


def _truth(lam: float, d: float, k: int) -> tuple[int, int, int] | None:
    """The counts of ``(lambda + d) I_k`` in the band ``t = k eps (|lambda| + |d|)``.

    ``None`` within a factor 2 of the band's edge: the library counts the band
    from ``A -+ tI``, whose dampings ``d -+ t`` round by ``eps |d| / 2``, as much
    as ``t`` itself for small ``k``.
    """
    a = lam + d  # exact within a few ulps of each other (Sterbenz)
    t = k * EPS * (abs(lam) + abs(d))
    if t / 2 <= abs(a) <= 2 * t:
        return None
    if abs(a) <= t:
        return (0, 0, k)
    return (k, 0, 0) if a > 0 else (0, k, 0)


def test_the_repro_is_not_a_zero_matrix() -> None:
    """adv14's case, ``d = -theta_max`` one ulp off ``lambda``: ``H + dI`` is not zero.

    A strict xfail in ``test_adversarial_near_inverse`` until fixed. ``H + dI`` is
    one ulp times ``I``, far inside the round-off ``eps (||H|| + |d|)`` of forming
    it: three zeros in the band (not "``H + dI`` is zero"), a refused solve.
    """
    model = nn.Sequential(nn.Linear(1, 3, bias=False)).to(DT)
    X = torch.tensor([[-0.72085433432664], [-0.31067639876160846]], dtype=DT)  # noqa: N806
    y = torch.zeros(2, 3, dtype=DT)
    H = hessinv.Hessian(model, _mse_sum, X, y)
    d = -H.spectral_bounds()[1]
    w = model[0].weight.detach()
    lam = float(torch.func.hessian(lambda v: _mse_sum(X @ v.T, y))(w)[0, 0, 0, 0])
    assert lam + d != 0.0, "the Ritz value is the diagonal itself: no cancellation to test"
    f = H.factor(d, method="lifted")
    assert f.norm() > 0.0
    inert = f.inertia()
    assert "is zero" not in inert.how
    assert inert.verified
    assert tuple(inert) == _truth(lam, d, 3) == (0, 0, 3), inert.how
    assert H.factor(d, method="lifted").is_positive_definite() is False
    with pytest.raises(SingularHessianError, match="damping"):
        H.solve(torch.ones(3, dtype=DT), damping=d)


@settings(max_examples=60, deadline=None)
@given(
    xs=st.lists(st.integers(-16, 16).filter(bool), min_size=1, max_size=4),
    k=st.integers(1, 4),
    ulps=st.integers(-3, 3),
    exponent=st.sampled_from([-40, -20, 0, 20, 40]),
)
def test_a_shift_within_ulps_of_the_spectrum(
    xs: list[int], k: int, ulps: int, exponent: int
) -> None:
    """``d = -lambda + j ulp``: no verified count is wrong; zeros are the band's.

    Loss scales ``2^{+-40}`` (about ``1e+-12``); every method.
    """
    H, lam = _scalar_net([x / 8 for x in xs], k, 2.0**exponent)
    d = -lam + ulps * math.ulp(lam)
    truth = _truth(lam, d, k)
    if truth is None:  # at the band's edge A -+ tI is singular: a refusal is an answer
        with contextlib.suppress(LiftedPrecisionError):
            assert sum(H.factor(d, method="lifted").inertia()) == k
        return
    for method in ("lifted", "dense"):
        inert = H.factor(d, method=method).inertia()
        assert sum(inert) == k
        if inert.verified:
            assert tuple(inert) == truth, (method, inert.how)
        pd = H.factor(d, method=method).is_positive_definite()
        assert pd is None or pd == (truth[0] == k), method
    if truth[2]:
        with pytest.raises(SingularHessianError, match="damping"):
            H.solve(torch.ones(k, dtype=DT), damping=d)


def test_the_cancelled_norm_is_measured_once_per_damping() -> None:
    """Four Lanczos products on ``H + dI``, kept on the operator; none without cancellation."""
    H, lam = _scalar_net([0.5, 0.25], 3, 1.0)
    calls = []
    matmat = H.matmat

    def counted(v: torch.Tensor) -> torch.Tensor:
        calls.append(v.shape[1])
        return matmat(v)

    H.spectral_bounds()
    H.matmat = counted  # type: ignore[method-assign]
    d = -lam + math.ulp(lam)
    first = shifted_norm(H, d)
    n_first = len(calls)
    assert n_first > 0
    assert shifted_norm(H, d) == first
    assert len(calls) == n_first
    assert 0.0 < first <= 4 * math.ulp(lam)
    shifted_norm(H, 1.0)  # far from cancelling: the Ritz values serve
    assert len(calls) == n_first
