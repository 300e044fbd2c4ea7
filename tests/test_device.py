"""Device independence of the lifted factorization (issue #12).

The stage loop keeps pivots and permutations on the device; the device path
of the permutation is checked on the CPU against LAPACK's interchanges, and
the whole solve, log-determinant and inertia run on CUDA where present, in
float64 and float32, against independent dense references.
"""

import copy

import pytest
import torch

import hessinv
from hessinv.blocktri import BlockTriLU
from hessinv.cli import make_mlp
from hessinv.lifted import lifted_dense
from hessinv.panel_lu import perm_from_pivots, perm_on_device

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("m,k", [(7, 4), (6, 6), (40, 25), (1, 1), (3, 0)])
def test_device_permutation_matches_lapack_interchanges(m, k):
    a = torch.randn(m, k, dtype=torch.float64, generator=torch.Generator().manual_seed(m + k))
    lu, piv, _ = torch.linalg.lu_factor_ex(a)
    perm, swaps = perm_on_device(piv, m)
    ref_perm, ref_swaps = perm_from_pivots(piv, m)  # LAPACK's interchanges applied in Python
    assert torch.equal(perm, ref_perm) and int(swaps) == int(ref_swaps)
    if k:  # A[perm] = L U, the definition, checked directly
        low = torch.tril(lu, -1) + torch.eye(m, k, dtype=lu.dtype)
        torch.testing.assert_close(a[perm], low @ torch.triu(lu[:k]), rtol=0, atol=1e-13)


def _random_blocktri(sizes, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    diag, upper = [], []
    for i, n in enumerate(sizes):
        d = torch.randn(n, n, generator=gen, dtype=torch.float64)
        diag.append((d + d.T).to(device, dtype))
        if i + 1 < len(sizes):
            upper.append(torch.randn(n, sizes[i + 1], generator=gen).to(device, dtype))
    return diag, upper


def _check_blocktri(device):
    diag, upper = _random_blocktri([5, 3, 6, 2, 4], device, torch.float64)
    lu = BlockTriLU(diag, upper)
    k = lifted_dense([d.cpu() for d in diag], [u.cpu() for u in upper])
    rhs = torch.randn(k.shape[0], 2, dtype=torch.float64)
    xs = lu.solve([r.to(device) for r in torch.split(rhs, lu.sizes)])
    x = torch.cat([t.cpu() for t in xs])
    ref = torch.linalg.solve(k, rhs)
    err = torch.linalg.norm(x - ref) / torch.linalg.norm(ref)
    assert err <= 1e3 * torch.finfo(torch.float64).eps * torch.linalg.cond(k)
    s, la = torch.linalg.slogdet(k)
    assert lu.slogdet()[0] == float(s)
    assert abs(lu.slogdet()[1] - float(la)) <= 1e-10 * max(1.0, abs(float(la)))


def test_blocktri_cpu():
    _check_blocktri("cpu")


@CUDA
def test_blocktri_cuda():
    _check_blocktri("cuda")


@CUDA
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hessian_solve_logdet_inertia_cuda(dtype):
    model, loss, X, y = make_mlp(4, 3, 2, dtype=dtype, device="cuda", gain=1.2)
    H = hessinv.Hessian(model, loss, X, y)
    d = 1e-2
    g = H.gradient()
    x = H.solve(g, damping=d, method="lifted")  # checked: backward error <= 64 eps
    assert x.device.type == "cuda" and x.dtype == dtype
    # independent reference: torch.func.hessian of the flat loss, in float64 on the CPU
    m64, l64 = copy.deepcopy(model).double().cpu(), loss
    X64, y64 = X.double().cpu(), y.double().cpu()
    names = [n for n, _ in m64.named_parameters()]
    shapes = [p.shape for p in m64.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])

    def f(flat):
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            ps[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return l64(torch.func.functional_call(m64, ps, (X64,)), y64)

    a = torch.func.hessian(f)(flat0) + d * torch.eye(flat0.numel(), dtype=torch.float64)
    ref = torch.linalg.solve(a, g.double().cpu())
    tol = 1e3 * torch.finfo(dtype).eps * torch.linalg.cond(a)
    assert torch.linalg.norm(x.double().cpu() - ref) <= tol * torch.linalg.norm(ref)
    ev = torch.linalg.eigvalsh(a)
    inert = H.inertia(d, method="lifted")
    assert tuple(inert) == (int((ev > 0).sum()), int((ev < 0).sum()), 0)
    s, la = H.logdet(d, method="lifted")
    s_ref, la_ref = torch.linalg.slogdet(a)
    assert s == float(s_ref)
    tol_ld = 1e3 * torch.finfo(dtype).eps * a.shape[0] * float(torch.linalg.cond(a))
    assert abs(la - float(la_ref)) <= tol_ld


def test_blocktri_device_path_on_cpu(monkeypatch):
    """The loop as it runs on a GPU (permutations by ``lu_unpack``), here on the CPU."""
    import hessinv.panel_lu as pl

    monkeypatch.setattr(pl, "perm_from_pivots", pl.perm_on_device)
    _check_blocktri("cpu")


def test_blocktri_recursive_panels_on_cpu(monkeypatch):
    """The loop with the GPU's recursive panel LU (leaves of 2 columns), here on the CPU."""
    import hessinv.blocktri as bt
    import hessinv.panel_lu as pl

    monkeypatch.setattr(bt, "panel_lu", lambda a: pl.recursive_lu(a, leaf=2))
    monkeypatch.setattr(pl, "perm_from_pivots", pl.perm_on_device)
    _check_blocktri("cpu")
