"""The inertia when no first-to-last congruence of ``K`` matches the LU's determinant.

On a ``K`` with many eigenvalues next to zero (a cluster of two thousand at
``d = 1e-12``, ``test_contract``), each congruence resolves the small
eigenvalues to a few digits only, and the sum of their logarithms can miss the
LU's ``log|det|`` by more than the tolerance, depending on the BLAS's summation
order (it did with two threads and not with one). The reversed congruence then
serves; the first-to-last attempts that missed the determinant still verify its
counts when they agree on every one, and leave it unverified when they do not.
"""

from __future__ import annotations

import dataclasses

import torch
from cases import DT, reference_loss_fn
from torch import nn

import hessinv
from hessinv.solvers.lifted_inertia import LiftedInertia

EPS = torch.finfo(DT).eps


def _problem(c: float):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    model = model.to(DT)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT)

    def loss(o, t):
        return c * ((o - t) ** 2).sum()

    f, x0 = reference_loss_fn(model, lambda o, t: ((o - t) ** 2).sum(), X, y)
    return hessinv.Hessian(model, loss, X, y), torch.func.hessian(f)(x0)


def _miss_forward(monkeypatch, mutate=None):  # noqa: ANN001, ANN202
    """Make every first-to-last attempt miss the determinant (``mutate`` its result too)."""
    real = LiftedInertia._first_congruence

    def fake(self, reference, blocks=None, *, reverse=False):  # noqa: ANN001, ANN202
        if reverse:
            return real(self, reference, blocks, reverse=True)
        before = len(self._unmatched)
        out = real(self, (reference[0], reference[1] + 50.0), blocks, reverse=False)
        assert out is None  # a determinant 50 nepers off matches nothing
        if mutate is not None:
            self._unmatched[before:] = [mutate(r) for r in self._unmatched[before:]]
        return None

    monkeypatch.setattr(LiftedInertia, "_first_congruence", fake)


def _reference(A, d):  # noqa: ANN001, ANN202
    ev = torch.linalg.eigvalsh(A) + d
    return int((ev > 0).sum()), int((ev < 0).sum()), 0


def test_counts_verified_by_the_attempts_that_missed_the_determinant(monkeypatch):
    """Indefinite ``H + dI`` (the Riccati pass cannot certify it), every scale."""
    for c in (1e-12, 1.0, 1e12):
        H, A = _problem(c)
        ev = torch.linalg.eigvalsh(A)
        d = -0.5 * float(ev[ev < 0].max() + ev[ev < 0].sort().values[-2])  # between two negatives
        with monkeypatch.context() as mp:
            _miss_forward(mp)
            fac = H.factor(c * d, "lifted")
            inert = fac.inertia()
            assert fac._congruence_reversed
        assert tuple(inert) == _reference(A, d), (c, inert.how)
        assert inert.verified and "agree on every count" in inert.how


def test_counts_that_disagree_leave_it_unverified(monkeypatch):
    """A first-to-last attempt with one eigenvalue moved across zero verifies nothing."""
    H, A = _problem(1.0)
    ev = torch.linalg.eigvalsh(A)
    d = -0.5 * float(ev[ev < 0].max() + ev[ev < 0].sort().values[-2])

    def moved(r):  # noqa: ANN001, ANN202
        return dataclasses.replace(r, positive=r.positive + 1, negative=r.negative - 1)

    _miss_forward(monkeypatch, moved)
    inert = H.factor(d, "lifted").inertia()
    assert tuple(inert) == _reference(A, d)  # the reversed congruence's counts
    assert not inert.verified and "NOT verified" in inert.how
