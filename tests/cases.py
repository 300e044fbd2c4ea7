"""A catalogue of networks, losses and batches, and independent dense references.

The reference loss is built from the model itself with ``functional_call``,
not from hessinv's stages. Its one substitution: ``nn.LayerNorm`` is replaced
by a module written here from elementary operations, because torch's fused
``layer_norm`` has wrong mixed second derivatives (pytorch#196700).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

DT = torch.float64


class RefLayerNorm(nn.Module):
    """Test-local layer norm with correct derivatives of every order."""

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        self.shape = tuple(ln.normalized_shape)
        self.eps = ln.eps
        self.weight = ln.weight
        self.bias = ln.bias

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.shape), 0))
        mu = z.mean(dim=dims, keepdim=True)
        var = ((z - mu) ** 2).mean(dim=dims, keepdim=True)
        out = (z - mu) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return out


class RefCELU(nn.Module):
    """CELU from elementary operations.

    torch's CELU backward rounds ``1/alpha`` to float32 (its derivative is off
    by ~1e-8 relative in float64 for ``alpha != 1``, while its forward is
    exact), so the references differentiate this form instead.
    """

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        return torch.clamp(z, min=0) + torch.clamp(a * (torch.exp(z / a) - 1), max=0)


def swap_celu(m: nn.Module) -> nn.Module:
    """``m`` with every ``nn.CELU`` replaced (in place) by :class:`RefCELU`."""
    for name, child in m.named_children():
        if isinstance(child, nn.CELU):
            setattr(m, name, RefCELU(child.alpha))
        else:
            swap_celu(child)
    return m


def _swap_layernorm(m: nn.Module) -> nn.Module:
    for name, child in m.named_children():
        if isinstance(child, nn.LayerNorm):
            setattr(m, name, RefLayerNorm(child))
        else:
            _swap_layernorm(child)
    return m


def reference_loss_fn(model: nn.Module, loss_func, X, y) -> tuple[Callable, torch.Tensor]:
    """``(f, x0)``: the loss as a function of the flat trainable parameters."""
    ref = _swap_layernorm(copy.deepcopy(model))
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in ref.named_parameters() if p.requires_grad]
    x0 = torch.cat([p.detach().reshape(-1) for n, p in ref.named_parameters() if p.requires_grad])

    def f(flat: torch.Tensor) -> torch.Tensor:
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = int(torch.tensor(s).prod()) if len(s) else 1
            ps[n] = flat[i : i + k].reshape(s)
            i += k
        return loss_func(torch.func.functional_call(ref, ps, (X,)), y)

    return f, x0


@dataclass
class Case:
    name: str
    build: Callable[[torch.Generator], tuple[nn.Module, object, torch.Tensor, torch.Tensor]]


def _reg(n, d_in, d_out, g):
    return torch.randn(n, d_in, generator=g, dtype=DT), torch.randn(n, d_out, generator=g, dtype=DT)


def _cls(n, d_in, k, g):
    return torch.randn(n, d_in, generator=g, dtype=DT), torch.randint(0, k, (n,), generator=g)


def _mlp(*mods):
    return nn.Sequential(*mods).to(DT)


def c_tanh_mse_mean(g):
    X, y = _reg(4, 3, 2, g)
    return (
        _mlp(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)),
        nn.MSELoss(),
        X,
        y,
    )


def c_sigmoid_mse_sum_n1(g):
    X, y = _reg(1, 4, 2, g)
    return _mlp(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)), nn.MSELoss(reduction="sum"), X, y


def c_gelu_ce_uneven_n16(g):
    X, y = _cls(16, 5, 3, g)
    return (
        _mlp(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 2), nn.GELU(), nn.Linear(2, 3)),
        nn.CrossEntropyLoss(),
        X,
        y,
    )


def c_silu_softplus_bce(g):
    X = torch.randn(5, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (5, 2), generator=g).to(DT)
    return (
        _mlp(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 2)),
        nn.BCEWithLogitsLoss(),
        X,
        y,
    )


def c_elu_leaky_nll_sum(g):
    X, y = _cls(3, 4, 3, g)
    return (
        _mlp(
            nn.Linear(4, 4),
            nn.ELU(),
            nn.Linear(4, 3),
            nn.LeakyReLU(0.1),
            nn.Linear(3, 3),
            nn.LogSoftmax(dim=1),
        ),
        nn.NLLLoss(reduction="sum"),
        X,
        y,
    )


def c_relu_ce_sum(g):
    X, y = _cls(8, 3, 4, g)
    return (
        _mlp(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)),
        nn.CrossEntropyLoss(reduction="sum"),
        X,
        y,
    )


def c_conv1d(g):
    X = torch.randn(3, 2, 7, generator=g, dtype=DT)
    y = torch.randn(3, 2, generator=g, dtype=DT)
    m = _mlp(nn.Conv1d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2))
    return m, nn.MSELoss(), X, y


def c_conv2d_ce(g):
    X = torch.randn(2, 1, 5, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (2,), generator=g)
    m = _mlp(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(2, 2, 2, stride=2, dilation=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    return m, nn.CrossEntropyLoss(), X, y


def c_layernorm(g):
    X, y = _reg(4, 3, 2, g)
    m = _mlp(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2))
    with torch.no_grad():
        m[1].weight.add_(0.3 * torch.randn(5, generator=g, dtype=DT))
        m[1].bias.add_(0.3 * torch.randn(5, generator=g, dtype=DT))
    return m, nn.MSELoss(), X, y


def c_nested_dropout_identity(g):
    X, y = _reg(2, 3, 3, g)
    m = _mlp(
        nn.Flatten(),
        nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh()),
        nn.Identity(),
        nn.Sequential(nn.Linear(4, 3)),
    )
    m.eval()
    return m, nn.MSELoss(), X, y


def c_frozen_nobias(g):
    X, y = _reg(3, 4, 2, g)
    m = _mlp(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2))
    m[2].bias.requires_grad_(False)
    return m, nn.MSELoss(reduction="sum"), X, y


def c_single_stage(g):
    X, y = _reg(2, 3, 2, g)
    return _mlp(nn.Linear(3, 2)), nn.MSELoss(), X, y


def c_deep_narrow(g):
    X, y = _reg(2, 3, 1, g)
    mods = [nn.Linear(3, 3), nn.Tanh()]
    for _ in range(5):
        mods += [nn.Linear(3, 3), nn.Tanh()]
    mods += [nn.Linear(3, 1)]
    return _mlp(*mods), nn.MSELoss(), X, y


def c_softmax_tail(g):
    X, y = _reg(3, 3, 2, g)
    return _mlp(nn.Linear(3, 4), nn.Softmax(dim=1), nn.Linear(4, 2)), nn.MSELoss(), X, y


def c_mish_callable_loss(g):
    X, y = _reg(4, 2, 2, g)

    def loss(out, t):
        return ((out - t) ** 4).sum() / 4

    return _mlp(nn.Linear(2, 3), nn.Mish(), nn.Linear(3, 2)), loss, X, y


CASES = [
    Case(f.__name__[2:], f)
    for f in [
        c_tanh_mse_mean,
        c_sigmoid_mse_sum_n1,
        c_gelu_ce_uneven_n16,
        c_silu_softplus_bce,
        c_elu_leaky_nll_sum,
        c_relu_ce_sum,
        c_conv1d,
        c_conv2d_ce,
        c_layernorm,
        c_nested_dropout_identity,
        c_frozen_nobias,
        c_single_stage,
        c_deep_narrow,
        c_softmax_tail,
        c_mish_callable_loss,
    ]
]


def build(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return case.build(g)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (max with tiny)."""
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-300))


def stages_hessian(stages, z0: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Dense ``H`` of a functional pipeline: ``torch.func.hessian`` of its loss in the flat
    parameters, composing the stage functions directly (no hessinv code)."""
    x0 = torch.cat([q.reshape(-1) for s in stages for q in s.params])

    def f(x: torch.Tensor) -> torch.Tensor:
        i, z = 0, z0
        for s in stages:
            ps = []
            for q in s.params:
                ps.append(x[i : i + q.numel()].reshape(q.shape))
                i += q.numel()
            z = s.fn(z, tuple(ps))
        return z.reshape(())

    return torch.func.hessian(f)(x0)


def tanh_net(width: int, batch: int, depth: int, gain: float, seed: int = 0, scale: float = 1.0):
    """A deep tanh MLP with 2 outputs and ``scale`` times the MSE loss (float64)."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for _ in range(depth - 1):
        lin = nn.Linear(width, width)
        nn.init.normal_(lin.weight, std=gain / width**0.5)
        mods += [lin, nn.Tanh()]
    mods.append(nn.Linear(width, 2))
    model = nn.Sequential(*mods).to(torch.float64)
    X = torch.randn(batch, width, dtype=torch.float64)
    y = torch.randn(batch, 2, dtype=torch.float64)

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return scale * nn.functional.mse_loss(out, target)

    return model, loss, X, y


def backward_error(a: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> float:
    """Normwise backward error ``||A x - g|| / (||A||_2 ||x|| + ||g||)`` against a dense ``A``."""
    r = a @ x - g
    den = torch.linalg.matrix_norm(a, 2) * torch.linalg.vector_norm(x) + torch.linalg.vector_norm(g)
    return float(torch.linalg.vector_norm(r) / den)


def reference_error(h: torch.Tensor) -> float:
    """A lower bound of the dense reference's own relative error: its asymmetry."""
    return float(torch.linalg.matrix_norm(h - h.T, 2) / torch.linalg.matrix_norm(h, 2))


def dense_hessian(model: nn.Module, loss, X, y) -> torch.Tensor:  # noqa: ANN001
    """``torch.func.hessian`` of the loss in the flat trainable parameters."""
    f, x0 = reference_loss_fn(model, loss, X, y)
    return torch.func.hessian(f)(x0).detach()


def last_stage_pivot_mu(model: nn.Module, loss, X, y) -> float:  # noqa: ANN001
    """The largest eigenvalue ``mu`` of the last stage's ``Txx`` on its kept basis.

    At damping ``-mu`` the stage elimination's last pivot ``Txx + dI`` is
    singular while ``H + dI`` (in general) is not. A case parameter computed with
    hessinv (the one helper here that uses it), never a reference.
    """
    import hessinv  # noqa: PLC0415
    from hessinv.solvers.lifted import LiftedFactorization  # noqa: PLC0415

    probe = LiftedFactorization(hessinv.Hessian(model, loss, X, y), 0.0, stage_solver=False)
    return float(torch.linalg.eigvalsh(probe.system.projections[-1].txx)[-1])


def kept_matrix(projections, blocks, h: torch.Tensor, d: float):  # noqa: ANN001, ANN201
    """``Q^T (H + dI) Q`` with ``Q = blockdiag(Q_l)`` the lifted system's kept bases, and the
    per-stage sizes ``k_l`` (``Q_l = I`` where a stage keeps all of its parameters)."""
    qs = [pr.q if pr.q is not None else torch.eye(b.num_params, dtype=h.dtype)
          for pr, b in zip(projections, blocks, strict=True)]  # fmt: skip
    q = torch.block_diag(*qs)
    return q.T @ (h + d * torch.eye(h.shape[0], dtype=h.dtype)) @ q, [t.shape[1] for t in qs]


def assert_kept_elimination(sr, kept: torch.Tensor, sizes: list[int], b: torch.Tensor) -> None:  # noqa: ANN001
    """A ``StageRiccati`` against the dense kept matrix: its unrefined solve of ``b`` (normwise
    backward error within ``1e4 eps``), its signature and its LU ``log|det|`` (Haynsworth)."""
    eps = torch.finfo(kept.dtype).eps
    w = torch.cat(sr.solve(list(torch.split(b, sizes))))
    eta = torch.linalg.vector_norm(kept @ w - b, dim=0) / (
        torch.linalg.matrix_norm(kept, 2) * torch.linalg.vector_norm(w, dim=0)
        + torch.linalg.vector_norm(b, dim=0)
    )
    assert float(eta.max()) <= 1e4 * eps
    ev = torch.linalg.eigvalsh(kept)
    pos, neg, zero, logabs = sr.signature()
    assert (pos, neg, zero) == (int((ev > 0).sum()), int((ev < 0).sum()), 0)
    ref = float(ev.abs().log().sum())
    assert abs(logabs - ref) <= 1e-9 * max(1.0, abs(ref))
    sign, la = sr.lu_slogdet()
    assert sign == (-1.0 if int((ev < 0).sum()) % 2 else 1.0)
    assert abs(la - ref) <= 1e-9 * max(1.0, abs(ref))
