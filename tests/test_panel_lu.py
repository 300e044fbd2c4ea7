"""The recursive panel LU (the GPU route of the block LU's panel step) against LAPACK."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hessinv.panel_lu import getrf, panel_lu, recursive_lu

EPS = torch.finfo(torch.float64).eps


def _unpack(lu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = lu.shape
    low = torch.tril(lu, -1) + torch.eye(m, n, dtype=lu.dtype, device=lu.device)
    return low, torch.triu(lu[:n])


def _check(a: torch.Tensor, leaf: int) -> None:
    lu, perm, swaps = recursive_lu(a, leaf=leaf)
    m, n = a.shape
    assert sorted(perm.tolist()) == list(range(m))  # a permutation
    low, up = _unpack(lu)
    # partial pivoting: every multiplier at most 1 in magnitude
    assert float(low.abs().max()) <= 1.0
    # the defining identity A[perm] = L U, at the level of LU's backward error
    err = torch.linalg.norm(a[perm] - low @ up) / max(float(torch.linalg.norm(a)), 1e-300)
    assert err <= 10 * n * EPS
    # the swap count is the parity of perm (the sign of det P)
    cycles, seen = 0, [False] * m
    for i in range(m):
        if not seen[i]:
            cycles += 1
            j = i
            while not seen[j]:
                seen[j] = True
                j = int(perm[j])
    assert (m - cycles) % 2 == int(swaps) % 2


@settings(max_examples=40, deadline=None)
@given(
    m_extra=st.integers(0, 40),
    n=st.integers(1, 40),
    leaf=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_recursive_lu_random(m_extra, n, leaf, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n + m_extra, n, generator=gen, dtype=torch.float64)
    _check(a, leaf)


def test_recursive_lu_same_pivots_and_determinant_as_lapack():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 300, generator=gen, dtype=torch.float64)
    lu, perm, swaps = recursive_lu(a, leaf=16)
    lu_ref, perm_ref, swaps_ref = getrf(a)
    # partial pivoting picks the same row at every column (no near-ties here)
    assert torch.equal(perm, perm_ref) and int(swaps) % 2 == int(swaps_ref) % 2
    torch.testing.assert_close(lu, lu_ref, rtol=0, atol=1e-10)
    sign, logabs = torch.linalg.slogdet(a)
    d = torch.diagonal(lu)
    assert float(sign) == (-1.0) ** ((int((d < 0).sum()) + int(swaps)) % 2)
    assert math.isclose(float(torch.log(d.abs()).sum()), float(logabs), rel_tol=1e-12)


def test_recursive_lu_singular_and_structured_panels():
    """Exactly zero columns and a [D; [0, -I]] panel (the lifted (v, lam) block's)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(50, 30, generator=gen, dtype=torch.float64)
    a[:, 7] = 0.0  # an exactly zero pivot: LU still defined, U[7, 7] == 0
    lu, perm, _ = recursive_lu(a, leaf=4)
    low, up = _unpack(lu)
    assert float(up[7, 7]) == 0.0
    torch.testing.assert_close(a[perm], low @ up, rtol=0, atol=1e-13)
    k, m = 12, 9
    d = torch.randn(k + m, k + m, generator=gen, dtype=torch.float64)
    d[k:, k:] = 0.0
    under = torch.cat(
        [torch.zeros(m, k, dtype=torch.float64), -torch.eye(m, dtype=torch.float64)], 1
    )
    _check(torch.cat([d + d.T, under]), leaf=3)


def test_panel_lu_is_getrf():
    a = torch.randn(600, 300, dtype=torch.float64)
    lu, perm, swaps = panel_lu(a)
    ref = getrf(a)
    assert torch.equal(lu, ref[0]) and torch.equal(perm, ref[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["cusolver", "magma", "default"])
def test_recursive_lu_cuda(dtype, backend):
    a = torch.randn(700, 520, dtype=dtype, device="cuda")
    lu, perm, swaps = recursive_lu(a, leaf=128, backend=backend)
    assert lu.device.type == "cuda" and perm.device.type == "cuda"
    low, up = _unpack(lu)
    err = torch.linalg.norm(a[perm] - low @ up) / torch.linalg.norm(a)
    assert float(err) <= 10 * 520 * torch.finfo(dtype).eps
    assert float(low.abs().max()) <= 1.0
