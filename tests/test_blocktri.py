"""The block-tridiagonal factorizations against dense linear algebra."""

from __future__ import annotations

import pytest
import torch
from cases import DT

from hessinv.blocktri import BlockTriLU, block_tri_inertia
from hessinv.lifted import lifted_dense


def random_blocktri(sizes, seed, *, zero_diag=False, scale_spread=0.0):
    g = torch.Generator().manual_seed(seed)
    diag, upper = [], []
    for k, n in enumerate(sizes):
        a = torch.randn(n, n, generator=g, dtype=DT)
        a = a + a.T
        if zero_diag:
            a = torch.zeros_like(a)  # forces pivoting across the block boundary
        diag.append(a * 10 ** (scale_spread * (k % 3 - 1)))
        if k + 1 < len(sizes):
            upper.append(torch.randn(n, sizes[k + 1], generator=g, dtype=DT))
    return diag, upper


CASES = [
    ([3, 4, 2, 5], False, 0.0),
    ([6] * 10, True, 0.0),
    ([1, 7, 1, 7, 1], False, 2.0),
    ([4] * 30, False, 1.0),
    ([5], False, 0.0),
]


@pytest.mark.parametrize("sizes,zero_diag,spread", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lu_solve_slogdet_inertia(sizes, zero_diag, spread, seed):
    diag, upper = random_blocktri(sizes, seed, zero_diag=zero_diag, scale_spread=spread)
    K = lifted_dense(diag, upper)
    n = K.shape[0]
    ev = torch.linalg.eigvalsh(K)
    if float(ev.abs().min()) < 1e-10 * float(ev.abs().max()):
        pytest.skip("random matrix numerically singular")
    lu = BlockTriLU(diag, upper)
    g = torch.Generator().manual_seed(seed + 100)
    R = torch.randn(n, 3, generator=g, dtype=DT)
    pieces = list(torch.split(R, sizes))
    X = torch.cat(lu.solve(pieces))
    res = torch.linalg.norm(K @ X - R) / torch.linalg.norm(R)
    Xd = torch.linalg.solve(K, R)
    res_d = torch.linalg.norm(K @ Xd - R) / torch.linalg.norm(R)
    assert res <= 100 * max(float(res_d), 1e-16)
    s, la = lu.slogdet()
    s_ref, la_ref = torch.linalg.slogdet(K)
    assert s == float(s_ref)
    assert abs(la - float(la_ref)) < 1e-9 * max(1.0, abs(float(la_ref)))
    r = block_tri_inertia(diag, upper)
    assert (r.positive, r.negative, r.zero) == (int((ev > 0).sum()), int((ev < 0).sum()), 0)
    assert r.sign == float(s_ref)
    assert abs(r.logabsdet - float(la_ref)) < 1e-8 * max(1.0, abs(float(la_ref)))


def test_inertia_counts_exact_zeros():
    # a block-diagonal matrix with an exactly singular block
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=DT))
    d0 = q @ torch.diag(torch.tensor([2.0, -1.0, 0.0, 0.0], dtype=DT)) @ q.T
    d1 = torch.diag(torch.tensor([3.0, -5.0, 1.0], dtype=DT))
    upper = [torch.zeros(4, 3, dtype=DT)]
    r = block_tri_inertia([d0, d1], upper)
    assert (r.positive, r.negative, r.zero) == (3, 2, 2)
    lu = BlockTriLU([d0, d1], upper)
    assert lu.singular


def test_lu_rejects_bad_block_counts():
    with pytest.raises(ValueError):
        BlockTriLU([torch.eye(2, dtype=DT)], [torch.eye(2, dtype=DT)])
