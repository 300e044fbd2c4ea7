"""The stage elimination on a Kronecker kept basis that is split already.

A Linear stage's kept basis ``Q = [I_a (x) Q_T, Q_B (x) Q_C]`` has ``Jx Q =
[J_1, 0]`` and ``Q^T Txx Q = [[T_11, 0], [0, 0]]``, so
:class:`hessinv.riccati_solve.StageRiccati` factors only the first ``a r_z``
rows of its pivot and eliminates the rest (pivot ``d I``) in closed form
(:func:`hessinv.riccati_solve.kept_split_rows`). Checked against the dense
kept matrix ``Q^T (H + dI) Q`` (``torch.func.hessian``, ``torch.linalg``):
the solve, the signature and the LU log-determinant, for definite and
indefinite shifts and loss scales from ``1e-9`` to ``1e9``.
"""

from __future__ import annotations

import pytest
import torch
from cases import assert_kept_elimination, dense_hessian, kept_matrix
from torch import nn

import hessinv
import hessinv.riccati_fused as fused_mod
from hessinv.riccati_solve import StageRiccati, kept_split_rows

DT = torch.float64
EPS = torch.finfo(DT).eps


def net(width: int, batch: int, depth: int, seed: int):  # noqa: ANN201
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for _ in range(depth - 1):
        lin = nn.Linear(width, width)
        nn.init.normal_(lin.weight, std=1.5 / width**0.5)
        mods += [lin, nn.Tanh()]
    mods.append(nn.Linear(width, 3))
    model = nn.Sequential(*mods).to(DT)
    return model, torch.randn(batch, width, dtype=DT), torch.randn(batch, 3, dtype=DT)


CASES = [
    # width, batch, depth, damping (relative to ||H||: negative is indefinite), loss scale, seed
    (6, 2, 5, 1e-3, 1.0, 0),
    (6, 2, 5, -0.02, 1.0, 1),
    (7, 3, 4, 0.3, 1e9, 2),
    (8, 2, 4, -0.1, 1e-9, 3),
]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "blockwise"])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_kept_split_against_the_dense_kept_matrix(case, fuse, monkeypatch) -> None:  # noqa: ANN001
    """Both forms of a stage's update (:mod:`hessinv.riccati_fused`, and block by block)."""
    if not fuse:
        monkeypatch.setattr(fused_mod, "FUSE_MAX", -1)
    width, batch, depth, rel_d, scale, seed = case
    model, X, y = net(width, batch, depth, seed)
    loss0 = nn.MSELoss()

    def loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scale * loss0(o, t)

    h = dense_hessian(model, loss, X, y)
    d = rel_d * float(torch.linalg.matrix_norm(h, 2))
    H = hessinv.Hessian(model, loss, X, y)
    ls = H.factor(d, method="lifted").system
    sr = StageRiccati(H.blocks, d, ls.projections)
    assert sr.ok
    # some stage eliminates free kept directions without a change of basis
    kept_free = [s.free for s in sr.stages if s.basis is None and s.free]
    assert kept_free
    for pr, b, s in zip(ls.projections, H.blocks, sr.stages, strict=True):
        if s.free:
            assert s.basis is None and pr.kron is not None
            k = pr.k(b.num_params)
            assert kept_split_rows(pr, k) == s.r and s.r + s.free == k
            # what the split imposes holds to round-off: Jx Q and Q^T Txx Q vanish past r
            if pr.jx is not None:
                assert float(pr.jx[:, s.r :].abs().max()) <= 10 * EPS * float(pr.jx.abs().max())
            if pr.txx is not None:
                assert float(pr.txx[s.r :].abs().max()) <= 10 * EPS * float(pr.txx.abs().max())
    kept, sizes = kept_matrix(ls.projections, H.blocks, h, d)
    b = torch.randn(kept.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(seed))
    assert_kept_elimination(sr, kept, sizes, b)


def test_no_kept_split_without_damping() -> None:
    """At ``d = 0`` the free directions' pivot would be zero: the kept basis is not split."""
    model, X, y = net(6, 2, 4, 0)
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    ls = H.factor(1e-3, method="lifted").system
    sr = StageRiccati(H.blocks, 0.0, ls.projections)
    assert all(s.free == 0 for s in sr.stages)
