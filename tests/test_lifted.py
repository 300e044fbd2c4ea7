"""The lifted system itself: its layout, its Schur complement onto ``v``, its inertia."""

from __future__ import annotations

import pytest
import torch
from cases import DT
from test_solve import tanh_mlp

import hessinv
from hessinv.lifted import LiftedSystem


@pytest.mark.parametrize("depth,width,batch", [(4, 3, 2), (5, 4, 3), (3, 6, 1)])
@pytest.mark.parametrize("damping", [0.5, -0.2])
def test_schur_complement_onto_v_is_the_damped_hessian(depth, width, batch, damping):
    """``K`` (``2L - 1`` blocks ``(v_l, lam_l)``, ``u_l``) is symmetric, block tridiagonal, and
    its Schur complement onto the kept ``v`` directions is ``Q^T (H + dI) Q``."""
    H = hessinv.Hessian(*tanh_mlp(depth, width, batch, gain=1.2))
    ls = LiftedSystem(H.blocks, damping)
    assert len(ls.diag) == 2 * depth - 1 == len(ls.upper) + 1
    assert [d.shape[0] for d in ls.diag[:]] == ls.sizes
    K = ls.dense()
    assert torch.allclose(K, K.T, rtol=0, atol=1e-13 * float(K.abs().max()))  # Tzz: round-off
    # indices of w_l (the first k_l entries of block 2l) in K
    offs = [0]
    for n in ls.sizes:
        offs.append(offs[-1] + n)
    v_idx = torch.cat([torch.arange(offs[2 * s], offs[2 * s] + k) for s, k in enumerate(ls._k)])
    rest = torch.tensor([i for i in range(K.shape[0]) if i not in set(v_idx.tolist())])
    S = K[v_idx][:, v_idx] - K[v_idx][:, rest] @ torch.linalg.solve(
        K[rest][:, rest], K[rest][:, v_idx]
    )
    Q = torch.block_diag(
        *[
            torch.eye(b.num_params, dtype=DT) if q is None else q
            for b, q in zip(H.blocks, ls.bases, strict=True)
        ]
    )
    ref = Q.T @ (H.to_dense() + damping * torch.eye(H.num_params, dtype=DT)) @ Q
    assert torch.allclose(S, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
    # Haynsworth: inertia(K) = inertia(S) + (m, m, 0)
    ek, es = torch.linalg.eigvalsh(K), torch.linalg.eigvalsh(0.5 * (S + S.T))
    assert int((ek > 0).sum()) == int((es > 0).sum()) + ls.m
    assert int((ek < 0).sum()) == int((es < 0).sum()) + ls.m


def test_rhs_and_extract_round_trip():
    """``extract`` reads ``v`` back from a lifted vector laid out as ``rhs`` lays out ``g``."""
    H = hessinv.Hessian(*tanh_mlp(4, 3, 2, gain=1.2))
    ls = LiftedSystem(H.blocks, 1.0)
    g = torch.randn(H.num_params, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    pieces = ls.rhs(g)
    assert [p.shape[0] for p in pieces] == ls.sizes
    # with w_l = Q_l^T g_l, extract returns Q w + (g - Q Q^T g) / d = g for d = 1
    assert torch.allclose(ls.extract(pieces, g), g, atol=1e-12)


@pytest.mark.parametrize("damping", [1e-3, -0.7, 2.0, 1e-9, 0.0])
def test_stages_keep_all_directions_where_the_basis_would_save_little(damping):
    """Width-8 stages at batch 4 see ``N (a + a_in) = 64`` of their 72 directions: with a
    damping of at least ``KEEP_ALL_DAMPING s`` they keep all 72 (``Q_l = I``), with a smaller
    one they split off the rest. Either way solve, log-determinant and inertia are those of
    the dense ``H + dI`` (``torch.func.hessian``)."""
    from cases import reference_loss_fn
    from torch import nn

    from hessinv.lifted import KEEP_ALL_DAMPING, curvature_scale

    torch.manual_seed(3)
    m = nn.Sequential(
        nn.Linear(3, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 2),
    ).to(DT)
    gen = torch.Generator().manual_seed(3)
    X, y = torch.randn(4, 3, generator=gen, dtype=DT), torch.randn(4, 2, generator=gen, dtype=DT)
    H = hessinv.Hessian(m, nn.MSELoss(), X, y)
    f, x0 = reference_loss_fn(m, nn.MSELoss(), X, y)
    A = torch.func.hessian(f)(x0) + damping * torch.eye(H.num_params, dtype=DT)
    s = curvature_scale(H.blocks, damping)
    ls = LiftedSystem(H.blocks, damping, scale=s)
    big = abs(damping) >= KEEP_ALL_DAMPING * s
    assert [q is None for q in ls.bases[1:3]] == [big, big]
    ev = torch.linalg.eigvalsh(A)
    t = H.num_params * torch.finfo(DT).eps * float(ev.abs().max())
    if damping == 0.0 or float(ev.abs().min()) <= t:
        with pytest.raises(hessinv.SingularHessianError):
            H.solve(H.gradient(), damping=damping)
        return
    g = H.gradient()
    x = H.solve(g, damping=damping, method="lifted")
    xd = torch.linalg.solve(A, g)
    res, res_d = (float(torch.linalg.vector_norm(A @ v - g)) for v in (x, xd))
    assert res <= 100 * max(res_d, 1e-16 * float(torch.linalg.vector_norm(g)))
    sign, la = H.logdet(damping, "lifted")
    s_ref, la_ref = torch.linalg.slogdet(A)
    assert sign == float(s_ref) and la == pytest.approx(float(la_ref), rel=1e-10, abs=1e-10)
    inert = H.inertia(damping, "lifted")
    assert tuple(inert) == (int((ev > t).sum()), int((ev < -t).sum()), 0) and inert.verified


def test_projections_are_computed_once_and_shared():
    """The kept bases and projected blocks are cached on the stage blocks: a second
    factorization, the inertia's congruences and the Riccati pass reuse them."""
    from hessinv.lifted import project_on

    H = hessinv.Hessian(*tanh_mlp(4, 3, 2, gain=1.2))
    fac = H.factor(0.5, method="lifted")
    first = [dict(b.__dict__["_projected"]) for b in H.blocks]
    H.inertia(0.5, "lifted")
    H.factor(0.7, method="lifted")
    for b, before in zip(H.blocks, first, strict=True):
        after = b.__dict__["_projected"]
        assert all(after[k] is v for k, v in before.items())
    for b, q in zip(H.blocks, fac.system.bases, strict=True):
        assert project_on(b, q) in b.__dict__["_projected"].values()


@pytest.mark.parametrize("n_full", [0, 1, 3])
def test_batched_maps_match_the_stage_by_stage_formulas(n_full):
    """Runs of equal stages (widths 5, 5, 5 then 7, 7; bases and ``Q_l = I`` mixed): ``rhs``
    and ``extract`` equal the per-stage ``Q_l^T g_l / s`` and ``Q_l w_l + (g_l - Q_l Q_l^T
    g_l) / d`` (first ``n_full`` columns; ``Q_l w_l`` for the others)."""
    from torch import nn

    torch.manual_seed(5)
    widths = (3, 5, 5, 5, 5, 7, 7, 7, 2)
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    m = nn.Sequential(*layers[:-1]).to(DT)
    gen = torch.Generator().manual_seed(5)
    X, y = torch.randn(2, 3, generator=gen, dtype=DT), torch.randn(2, 2, generator=gen, dtype=DT)
    H = hessinv.Hessian(m, nn.MSELoss(), X, y)
    d, s = 0.3, 4.0
    ls = LiftedSystem(H.blocks, d, scale=s)
    assert len(ls._maps.runs) < len(H.blocks)  # some runs, several stages each
    assert {q is None for q in ls.bases} == {True, False}
    g = torch.randn(H.num_params, 3, generator=gen, dtype=DT)
    x = [torch.randn(n, 3, generator=gen, dtype=DT) for n in ls.sizes]
    gs = torch.split(g, [b.num_params for b in H.blocks])
    rhs, proj = ls.rhs_and_projections(g)
    want = []
    for l, (q, gl) in enumerate(zip(ls.bases, gs, strict=True)):  # noqa: E741
        top = (gl if q is None else q.T @ gl) / s
        if l < len(H.blocks) - 1:
            want += [torch.cat([top, torch.zeros(ls._m[l], 3, dtype=DT)]), torch.zeros(ls._m[l], 3)]
        else:
            want.append(top)
    assert len(rhs) == len(want)
    for a, b in zip(rhs, want, strict=True):
        assert torch.allclose(a, b.to(DT), rtol=1e-14, atol=1e-15)
    parts = []
    for l, (q, gl) in enumerate(zip(ls.bases, gs, strict=True)):  # noqa: E741
        w = x[2 * l][: ls._k[l]]
        if q is None:
            parts.append(w)
            continue
        full = q @ w + (gl - q @ (q.T @ gl)) / d
        parts.append(torch.cat([full[:, :n_full], (q @ w)[:, n_full:]], dim=1))
    ref = torch.cat(parts)
    for pr in (None, proj):
        got = ls.extract(x, g, n_full=n_full, projections=pr)
        assert torch.allclose(got, ref, rtol=1e-13, atol=1e-13)


def test_merged_partition_is_the_same_matrix():
    """Small neighbours merged (``lifted_merge``): the same ``K`` densely, ``join``/``split``
    inverse to each other, and the merged LU's solve and determinant those of ``K``."""
    from hessinv.blocktri import BlockTriLU
    from hessinv.lifted import lifted_dense
    from hessinv.lifted_merge import MergedBlocks, merge_groups

    assert merge_groups([28, 8, 28, 8, 28], 64) == [[0, 1, 2], [3, 4]]
    assert merge_groups([96, 32, 96], 64) == [[0], [1], [2]]
    assert merge_groups([70, 3, 3], 64) == [[0], [1, 2]]
    H = hessinv.Hessian(*tanh_mlp(6, 3, 2, gain=1.2))
    ls = LiftedSystem(H.blocks, 0.3)
    mb = MergedBlocks(ls.diag, ls.upper, ls.sizes)
    assert len(mb.sizes) < len(ls.sizes) and sum(mb.sizes) == sum(ls.sizes)
    K = ls.dense()
    assert torch.equal(lifted_dense(list(mb.diag[:]), list(mb.upper[:])), K)
    parts = [torch.randn(n, 2, dtype=DT) for n in ls.sizes]
    back = mb.split(mb.join(parts))
    assert all(torch.equal(a, b) for a, b in zip(back, parts, strict=True))
    lu = BlockTriLU(mb.diag, mb.upper)
    x = torch.cat(mb.split(lu.solve(mb.join(parts))))
    r = torch.cat(parts)
    xd = torch.linalg.solve(K, r)
    assert torch.linalg.norm(K @ x - r) <= 100 * max(torch.linalg.norm(K @ xd - r), 1e-15)
    s_ref, la_ref = torch.linalg.slogdet(K)
    assert lu.slogdet()[0] == float(s_ref)
    assert lu.slogdet()[1] == pytest.approx(float(la_ref), rel=1e-12, abs=1e-12)
