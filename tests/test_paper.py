"""The paper's matrices (eqs. 6-8, 24) and its Woodbury inverse (Section 6)."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, DT, build, rel

import hessinv
from hessinv import Stage
from hessinv.paper import PaperMatrices
from hessinv.woodbury import WoodburyAssumptionError, woodbury_solve


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_paper_matrices_equal_fast_path_and_autodiff(case):
    H = hessinv.Hessian(*build(case))
    pm = PaperMatrices(H.blocks)
    Hd = H.to_dense()
    assert rel(pm.hessian_dense(), Hd) <= 1e-12
    V = torch.randn(H.num_params, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    assert rel(pm.hvp(V), H @ V) <= 1e-12
    assert rel(pm.gradient()[:, 0], H.gradient()) <= 1e-12
    # b = e_L M^{-1} holds the cotangents: its last entry is b_L = 1
    assert float(pm.b()[-1]) == 1.0
    # M is unit lower block-bidiagonal: its inverse applied by substitution matches dense
    r = torch.randn(sum(pm.out_sizes), 1, dtype=DT)
    assert rel(pm.M.to_dense() @ pm.M.solve(r), r) <= 1e-12
    assert rel(pm.M.to_dense().T @ pm.M.solve_transposed(r), r) <= 1e-12


def elementwise_pipeline(depth=6, width=3, seed=0, quartic=0.1):
    """Stages ``z = tanh(x * z_prev + c)`` (one parameter per activation), one sample,
    and a loss with one parameter: Section 6's assumptions hold."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(1, width, generator=g, dtype=DT)
    stages = []
    for _ in range(depth):
        c = 0.3 * torch.randn(width, generator=g, dtype=DT)
        x = torch.randn(width, generator=g, dtype=DT)
        stages.append(Stage(lambda z, p, c=c: torch.tanh(p[0] * z + c), (x,)))
    t = torch.tensor(0.7, dtype=DT)
    stages.append(
        Stage(
            lambda z, p: 0.5 * ((p[0] * z.sum(1) - t) ** 2).sum() + quartic * (z**4).sum(),
            (torch.tensor([1.3], dtype=DT),),
        )
    )
    return stages, z0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("depth,width", [(1, 1), (4, 2), (8, 3), (16, 4)])
def test_woodbury_matches_dense_solve(seed, depth, width):
    stages, z0 = elementwise_pipeline(depth, width, seed)
    H = hessinv.Hessian.from_stages(stages, z0)
    A = H.to_dense()
    ev = torch.linalg.eigvalsh(A)
    g = torch.randn(H.num_params, 2, dtype=DT, generator=torch.Generator().manual_seed(seed))
    x = H.solve(g, method="woodbury")
    xd = torch.linalg.solve(A, g)
    cond = float(ev.abs().max() / ev.abs().min())
    # forward error of a backward-stable solve is about cond * eps
    assert rel(x, xd) <= 1e3 * cond * torch.finfo(DT).eps
    # normwise backward error (Rigal-Gaches) at the level of a stable solve
    eta = torch.linalg.norm(A @ x - g) / (
        torch.linalg.norm(A) * torch.linalg.norm(x) + torch.linalg.norm(g)
    )
    assert float(eta) <= 1e3 * torch.finfo(DT).eps


def test_woodbury_assumption_errors_name_the_assumption():
    # dense layers: D_x blocks are not square
    case = next(c for c in CASES if c.name == "tanh_mse_mean")
    H = hessinv.Hessian(*build(case))
    g = torch.ones(H.num_params, dtype=DT)
    with pytest.raises(WoodburyAssumptionError, match="not square"):
        H.solve(g, method="woodbury")
    # two samples: D_x blocks are 2a x a
    stages, z0 = elementwise_pipeline(3, 2)
    H2 = hessinv.Hessian.from_stages(stages, torch.cat([z0, z0 + 1]))
    with pytest.raises(WoodburyAssumptionError, match="not square"):
        H2.solve(torch.ones(H2.num_params, dtype=DT), method="woodbury")
    # Q_22 = D_D D_xx singular: a stage linear in its parameter (z = x * z_prev + c)
    stages, z0 = elementwise_pipeline(3, 2)
    stages[1] = Stage(lambda z, p: p[0] * z + 0.5, (torch.ones(2, dtype=DT) * 0.9,))
    H3 = hessinv.Hessian.from_stages(stages, z0)
    with pytest.raises(WoodburyAssumptionError, match="Q_22"):
        H3.solve(torch.ones(H3.num_params, dtype=DT), method="woodbury")
    # D_x singular: a zero input makes d f / d x = 0
    stages, _ = elementwise_pipeline(2, 2)
    H4 = hessinv.Hessian.from_stages(stages, torch.zeros(1, 2, dtype=DT))
    with pytest.raises(WoodburyAssumptionError, match="D_x block of stage 0"):
        H4.solve(torch.ones(H4.num_params, dtype=DT), method="woodbury")
    # no damping term in Section 6
    stages, z0 = elementwise_pipeline(3, 2)
    H5 = hessinv.Hessian.from_stages(stages, z0)
    with pytest.raises(WoodburyAssumptionError, match="damping"):
        H5.solve(torch.ones(H5.num_params, dtype=DT), damping=0.1, method="woodbury")
    assert issubclass(WoodburyAssumptionError, ValueError)


def test_text_partition_pivot_is_always_singular():
    """Documents the gap recorded in docs/paper-notes.md: S_H11's last block is 0."""
    stages, z0 = elementwise_pipeline(4, 2)
    H = hessinv.Hessian.from_stages(stages, z0)
    pm = PaperMatrices(H.blocks)
    # Q_11's last block is -I (P^T drops z_L), so S_q^{-1} + I vanishes there
    n_last = pm.out_sizes[-1]
    q11_last = -torch.eye(n_last, dtype=DT)
    assert torch.equal(
        torch.linalg.inv(q11_last) + torch.eye(n_last, dtype=DT), torch.zeros(1, 1, dtype=DT)
    )
    x = woodbury_solve(H.blocks, torch.ones(H.num_params, 1, dtype=DT))
    assert torch.isfinite(x).all()
