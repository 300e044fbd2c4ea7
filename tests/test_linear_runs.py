"""Runs of ``Linear -> activation`` stages built batched (``hessinv.derivatives.linear_runs``).

Every block of every stage in a run is compared with the generic autodiff
blocks (``generic=True``: ``torch.func`` on each stage's function, no chain
rule, no closed form), and ``H`` itself with ``torch.func.hessian`` of the
flat-parameter loss, over tails (none, smooth, piecewise linear, with
options), bias or not, widths that change (``a_in != a``), batch 1 and 3.
"""

from __future__ import annotations

import pytest
import torch
from cases import dense_hessian
from torch import nn

import hessinv
from hessinv.derivatives.linear_runs import linear_runs
from hessinv.products import compute_blocks

DT = torch.float64
EPS = torch.finfo(DT).eps

TAILS = {
    "none": lambda: None,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": lambda: nn.Softplus(beta=2.0, threshold=5.0),
    "elu": lambda: nn.ELU(alpha=0.7),
    "sigmoid": nn.Sigmoid,
    "leaky": lambda: nn.LeakyReLU(0.2),
}


def net(widths: list[int], tail: str, bias: bool, batch: int, seed: int = 0):  # noqa: ANN201
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        lin = nn.Linear(a, b, bias=bias)
        nn.init.normal_(lin.weight, std=1.3 / a**0.5)
        mods.append(lin)
        t = TAILS[tail]()
        if t is not None:
            mods.append(t)
    mods.append(nn.Linear(widths[-1], 2, bias=bias))
    model = nn.Sequential(*mods).to(DT)
    X = torch.randn(batch, widths[0], dtype=DT)
    y = torch.randn(batch, 2, dtype=DT)
    return model, nn.MSELoss(reduction="sum"), X, y


def _close(a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and float((a - b).abs().max()) <= 100 * EPS * scale


CASES = [
    # widths, tail, bias, batch
    ([5, 5, 5, 5, 5], "tanh", True, 3),
    ([4, 6, 6, 6, 3], "tanh", False, 1),
    ([5, 5, 5, 5], "none", True, 2),
    ([5, 5, 5, 5, 5], "relu", True, 3),
    ([4, 4, 4, 4, 4], "softplus", True, 2),
    ([4, 4, 4, 4], "elu", False, 3),
    ([6, 4, 4, 4, 4], "sigmoid", True, 2),
    ([4, 5, 5, 5, 5], "leaky", True, 2),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-bias{c[2]}-n{c[3]}" for c in CASES])
def test_run_blocks_equal_the_generic_blocks(case) -> None:  # noqa: ANN001
    widths, tail, bias, batch = case
    model, loss, X, y = net(widths, tail, bias, batch)
    H = hessinv.Hessian(model, loss, X, y)
    pipe = H.pipeline
    runs = linear_runs(pipe.stages, pipe.forward())
    assert runs and sum(hi - lo for lo, hi in runs) >= 2  # the batched build is exercised
    _, fast = compute_blocks(pipe)
    _, ref = compute_blocks(pipe, generic=True)
    for l, (f, g) in enumerate(zip(fast, ref, strict=True)):  # noqa: E741
        scale = max(float(t.abs().max()) for t in (g.Jz, g.Jx, g.Tzz, g.Tzx, g.Txx, g.grad_x)
                    if t is not None and t.numel())  # fmt: skip
        for name in ("Jz", "Jx", "Tzz", "Tzx", "Txx", "grad_x", "cot_in"):
            assert _close(getattr(f, name), getattr(g, name), scale), (l, name)
        if f.x_span is not None and f.kron_x is not None:
            # the promise of x_span: its rows span Jx's rows
            q, _ = torch.linalg.qr(f.x_span.reshape(-1, f.num_params).T)
            if g.Jx is not None:
                jx = g.Jx.reshape(-1, f.num_params)
                assert float((jx - jx @ q @ q.T).abs().amax()) <= 100 * EPS * scale


@pytest.mark.parametrize("case", CASES[:4], ids=[f"{c[1]}-bias{c[2]}" for c in CASES[:4]])
def test_hessian_and_solve_through_runs(case) -> None:  # noqa: ANN001
    widths, tail, bias, batch = case
    model, loss, X, y = net(widths, tail, bias, batch, seed=1)
    h = dense_hessian(model, loss, X, y)
    H = hessinv.Hessian(model, loss, X, y)
    v = torch.randn(H.num_params, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    hv = H @ v
    scale = float(torch.linalg.matrix_norm(h, 2)) * float(v.abs().max()) * H.num_params
    assert float((hv - h @ v).abs().max()) <= 100 * EPS * scale
    d = 0.1 * float(torch.linalg.matrix_norm(h, 2))
    x = H.solve(v, damping=d)
    a = h + d * torch.eye(h.shape[0], dtype=DT)
    res = torch.linalg.vector_norm(a @ x - v, dim=0)
    eta = res / (torch.linalg.matrix_norm(a, 2) * torch.linalg.vector_norm(x, dim=0)
                 + torch.linalg.vector_norm(v, dim=0))  # fmt: skip
    assert float(eta.max()) <= 64 * EPS


def test_runs_need_equal_stages() -> None:
    """A tail of two modules, another activation or a changed width ends a run."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
        nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Identity(),
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1),
    ).to(DT)  # fmt: skip
    X, y = torch.randn(3, 4, dtype=DT), torch.randn(3, 1, dtype=DT)
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    pipe = H.pipeline
    runs = linear_runs(pipe.stages, pipe.forward())
    # stages: 0 L-T | 1 L-T | 2 L-T | 3 L-R | 4 L-T-I | 5 L(4->5)-T | 6 L-T | 7 L+loss
    assert runs == [(1, 3)]


class _ScaledTanh(nn.Module):
    """``tanh(k z)``, its option ``k`` a plain attribute (not in ``extra_repr``)."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.k * z)


def test_a_users_activation_shares_no_derivatives_across_instances() -> None:
    """A user-registered elementwise class (adv18): its instances' options may live anywhere,
    so stages with different instances are not one run; ``H`` stays exact."""
    from hessinv.derivatives import ElementwiseDerivatives, register, unregister

    class _ScaledTanhDerivatives(ElementwiseDerivatives):
        """``phi'``, ``phi''`` by autodiff of the module (the registry's default)."""

    register(_ScaledTanh, _ScaledTanhDerivatives)
    try:
        torch.manual_seed(0)
        shared = _ScaledTanh(0.7)
        model = nn.Sequential(
            nn.Linear(3, 3), _ScaledTanh(1.0), nn.Linear(3, 3), _ScaledTanh(3.0),
            nn.Linear(3, 3), _ScaledTanh(0.2), nn.Linear(3, 3), shared, nn.Linear(3, 3),
            shared, nn.Linear(3, 3), shared, nn.Linear(3, 1),
        ).to(DT)  # fmt: skip
        X, y = torch.randn(2, 3, dtype=DT), torch.randn(2, 1, dtype=DT)
        H = hessinv.Hessian(model, nn.MSELoss(), X, y)
        # stages 1, 2 differ in k: in no run; the instance shared by 3-5 makes one
        runs = linear_runs(H.pipeline.stages, H.pipeline.forward())
        assert runs and all(lo >= 3 for lo, _ in runs)
        h = dense_hessian(model, nn.MSELoss(), X, y)
        v = torch.randn(H.num_params, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
        scale = float(torch.linalg.matrix_norm(h, 2)) * float(v.abs().max()) * H.num_params
        assert float((H @ v - h @ v).abs().max()) <= 100 * EPS * scale
    finally:
        unregister(_ScaledTanh)


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU, nn.Sigmoid])
def test_one_activation_instance_used_twice(act) -> None:  # noqa: ANN001
    """``nn.Sequential`` runs a module listed twice twice; ``named_children`` lists it once,
    which silently dropped its second use from the pipeline (H off by O(1))."""
    torch.manual_seed(0)
    shared = act()
    model = nn.Sequential(
        nn.Linear(3, 4), shared, nn.Linear(4, 4), shared, nn.Linear(4, 4), shared,
        nn.Linear(4, 1),
    ).to(DT)  # fmt: skip
    X, y = torch.randn(3, 3, dtype=DT), torch.randn(3, 1, dtype=DT)
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    assert len(H.pipeline.stages) == 4
    h = dense_hessian(model, nn.MSELoss(), X, y)
    v = torch.randn(H.num_params, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    scale = float(torch.linalg.matrix_norm(h, 2)) * float(v.abs().max()) * H.num_params
    assert float((H @ v - h @ v).abs().max()) <= 100 * EPS * scale
