"""Independent dense references and the outcome criteria of the reliability campaign.

Nothing here imports hessinv's numerical code: the reference loss is the model
itself run by ``torch.func.functional_call`` on the flat parameters (with
``nn.LayerNorm`` swapped for an elementary one, because torch's fused
``layer_norm`` has wrong mixed second derivatives, pytorch#196700), or the
user's stage functions composed directly; ``torch.func.hessian`` forms the
dense Hessian; ``torch.linalg`` does the rest. The criteria are documented in
``reliability.py``'s module docstring.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

F64, F32 = torch.float64, torch.float32
EPS = {F64: torch.finfo(F64).eps, F32: torch.finfo(F32).eps}
CLEAR_BUILTINS = (ValueError, TypeError, MemoryError)


class RefLayerNorm(nn.Module):
    """Layer norm from elementary operations (correct derivatives of every order)."""

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        self.shape = tuple(ln.normalized_shape)
        self.eps = ln.eps
        self.weight = ln.weight
        self.bias = ln.bias

    def forward(self, z: Tensor) -> Tensor:
        dims = tuple(range(-len(self.shape), 0))
        mu = z.mean(dim=dims, keepdim=True)
        var = ((z - mu) ** 2).mean(dim=dims, keepdim=True)
        out = (z - mu) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return out


def _swap_layernorm(m: nn.Module) -> nn.Module:
    for name, child in m.named_children():
        if isinstance(child, nn.LayerNorm):
            setattr(m, name, RefLayerNorm(child))
        else:
            _swap_layernorm(child)
    return m


def model_loss_fn(model: nn.Module, loss_func: Callable, X: Tensor, y: Tensor):  # noqa: N803
    """``(f, x0)``: the loss as a function of the flat trainable parameters of ``model``."""
    ref = _swap_layernorm(copy.deepcopy(model))
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    x0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(flat: Tensor) -> Tensor:
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = math.prod(s)
            ps[n] = flat[i : i + k].reshape(s)
            i += k
        return loss_func(torch.func.functional_call(ref, ps, (X,)), y)

    return f, x0


def stages_loss_fn(fns: list[Callable], params: list[tuple[Tensor, ...]], z0: Tensor):
    """``(f, x0)`` for a functional pipeline given as plain functions and parameter tuples."""
    shapes = [[p.shape for p in ps] for ps in params]
    x0 = torch.cat([p.detach().reshape(-1) for ps in params for p in ps])

    def f(flat: Tensor) -> Tensor:
        z, i = z0, 0
        for fn, ss in zip(fns, shapes, strict=True):
            ps = []
            for s in ss:
                k = math.prod(s)
                ps.append(flat[i : i + k].reshape(s))
                i += k
            z = fn(z, tuple(ps))
        return z

    return f, x0


@dataclass
class Reference:
    """Dense float64 reference of one problem plus the float32 dense baseline.

    ``H``, ``g``: float64 ``torch.func.hessian`` / gradient. ``H32``, ``g32``: the
    same autodiff in float32 (the "dense method in float32" the float32 answers
    are compared with). ``evals``: ``eigvalsh(H)``.
    """

    H: Tensor
    g: Tensor
    loss: float
    H32: Tensor | None
    g32: Tensor | None
    evals: Tensor = field(init=False)
    hnorm: float = field(init=False)
    _e32: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.evals = torch.linalg.eigvalsh(self.H)
        self.hnorm = float(self.evals.abs().max()) if self.evals.numel() else 0.0

    @property
    def W(self) -> int:  # noqa: N802
        return self.H.shape[0]

    def forming_error(self, dtype: torch.dtype) -> float:
        """Relative spectral-norm error ``delta`` of the dense Hessian formed in ``dtype``.

        Measured in float32 (``||H32 - H|| / ||H||``); float64's is extrapolated
        by the ratio of the machine epsilons (the same computation, rounded finer).
        """
        if self.H32 is None or self.hnorm == 0.0:
            return 0.0
        if self._e32 is None:
            d = self.H32.to(F64) - self.H
            finite = bool(torch.isfinite(d).all())
            self._e32 = float(torch.linalg.matrix_norm(d, ord=2)) / self.hnorm if finite else 1.0
        return self._e32 if dtype == F32 else self._e32 * EPS[F64] / EPS[F32]


def build_reference(f64: Callable, x64: Tensor, f32: Callable | None, x32: Tensor | None):
    """Dense reference of ``f64`` at ``x64`` (and the float32 baseline of ``f32`` at ``x32``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        H = torch.func.hessian(f64)(x64).detach()
        g = torch.func.grad(f64)(x64).detach()
        loss = float(f64(x64))
        H32 = g32 = None
        if f32 is not None:
            H32 = torch.func.hessian(f32)(x32).detach()
            g32 = torch.func.grad(f32)(x32).detach()
    return Reference(H, g, loss, H32, g32)


# -- criteria -----------------------------------------------------------------


def band(ref: Reference, d: float, dtype: torch.dtype) -> float:
    """Undecidable band ``b``: eigenvalues ``mu`` of ``H + dI`` with ``|mu| <= b``.

    ``b = W eps ||H + dI|| + 10 delta ||H||``: ``W eps`` for the backward error of
    an eigensolver or factorization in ``dtype``, ``delta`` the measured error of
    forming ``H`` in ``dtype`` (Weyl: eigenvalues move by at most ``||dH||``).
    """
    an = float((ref.evals + d).abs().max()) if ref.W else abs(d)
    return ref.W * EPS[dtype] * an + 10.0 * ref.forming_error(dtype) * ref.hnorm


def refusal_justified(ref: Reference, d: float, dtype: torch.dtype) -> bool:
    """A singular-matrix refusal is justified iff ``sigma_min(H + dI) <= 1e3 eps ||H + dI||``.

    (``cond >= 1e-3 / eps``) or the forming error of ``H`` in ``dtype`` reaches
    ``sigma_min`` (``10 delta ||H|| >= sigma_min``).
    """
    mu = (ref.evals + d).abs()
    if mu.numel() == 0:
        return False
    smin, smax = float(mu.min()), float(mu.max())
    return smin <= 1e3 * EPS[dtype] * smax or smin <= 10.0 * ref.forming_error(dtype) * ref.hnorm


def backward_error(ref: Reference, d: float, x: Tensor, g: Tensor) -> float:
    """Max over columns of ``||(H + dI) x - g|| / (||H + dI|| ||x|| + ||g||)`` in float64."""
    x64, g64 = x.to(F64).reshape(g.shape[0], -1), g.to(F64).reshape(g.shape[0], -1)
    if x64.numel() == 0:
        return 0.0
    if not torch.isfinite(x64).all():
        return math.inf
    an = float((ref.evals + d).abs().max())
    r = ref.H @ x64 + d * x64 - g64
    num = torch.linalg.vector_norm(r, dim=0)
    den = an * torch.linalg.vector_norm(x64, dim=0) + torch.linalg.vector_norm(g64, dim=0)
    return float((num / den.clamp_min(1e-300)).max())


def dense_lu_backward_error(ref: Reference, d: float, g: Tensor, dtype: torch.dtype) -> float:
    """Backward error of the dense LU solve in ``dtype`` (of the Hessian formed in ``dtype``)."""
    H = ref.H if dtype == F64 else ref.H32
    A = H + d * torch.eye(ref.W, dtype=dtype)
    try:
        x = torch.linalg.solve(A, g.to(dtype))
    except RuntimeError:
        return 1.0
    return min(1.0, backward_error(ref, d, x, g))


def solve_ok(ref: Reference, d: float, x: Tensor, g: Tensor, dtype: torch.dtype):
    """``(ok, detail)``: backward error within ``100 max(BE of dense LU, 4 eps)``."""
    be = backward_error(ref, d, x, g)
    be_lu = dense_lu_backward_error(ref, d, g, dtype)
    lim = 100.0 * max(be_lu, 4.0 * EPS[dtype])
    return be <= lim, {"backward_error": be, "dense_lu_backward_error": be_lu, "limit": lim}


def inertia_ok(ref: Reference, d: float, got, dtype: torch.dtype):
    """Counts within what the reference decides (``|mu| <= band`` may go anywhere)."""
    b = band(ref, d, dtype)
    mu = ref.evals + d
    pos, neg = int((mu > b).sum()), int((mu < -b).sum())
    und = ref.W - pos - neg
    p, n, z = (int(t) for t in tuple(got)[:3])
    ok = p + n + z == ref.W and pos <= p <= pos + und and neg <= n <= neg + und
    return ok, {"got": [p, n, z], "sure_pos": pos, "sure_neg": neg, "undecidable": und, "band": b}


def logdet_ok(ref: Reference, d: float, got, dtype: torch.dtype):
    """Sign exact unless some ``|mu_i| <= b``; ``log|det|`` within ``sum_i -log(1 - 100 b/|mu_i|)``.

    (``100 b``: the same factor 100 over the eigenvalue perturbation bound as the
    solves get over a dense LU, plus ``100 eps sum_i |log|mu_i||`` for the summation.)
    The sign is undecidable if some ``|mu_i| <= b``, the magnitude if some
    ``|mu_i| <= 100 b``: then any answer is accepted for that part, and
    ``(0, -inf)`` (singular) is accepted only if the sign is undecidable.
    """
    b = band(ref, d, dtype)
    mu = (ref.evals + d).abs()
    s, la = float(got[0]), float(got[1])
    info = {"got": [s, la], "band": b}
    if ref.W == 0:
        return s == 1.0 and la == 0.0, info
    s_ref = -1.0 if int(((ref.evals + d) < 0).sum()) % 2 else 1.0
    la_ref = float(torch.log(mu).sum())
    info["ref"] = [s_ref, la_ref]
    if bool((mu <= b).any()):
        info["undecidable"] = "sign"
        return True, info
    if s != s_ref:
        return False, info
    if bool((mu <= 100 * b).any()):
        info["undecidable"] = "magnitude"
        return True, info
    tol = float((-torch.log1p(-100 * b / mu)).sum())
    tol += 100 * EPS[dtype] * float(torch.log(mu).abs().sum())
    info["tol"] = tol
    return math.isfinite(la) and abs(la - la_ref) <= tol, info


def pd_ok(ref: Reference, d: float, got, dtype: torch.dtype):
    """``True`` only if no eigenvalue is surely negative or zero-ish below ``-b``; ``False``
    only if some eigenvalue is below ``+b``; ``None`` always accepted."""
    b = band(ref, d, dtype)
    lmin = float((ref.evals + d).min()) if ref.W else math.inf
    info = {"got": got, "lambda_min": lmin, "band": b}
    if got is None:
        return True, info
    if got is True:
        return lmin > -b, info
    if got is False:
        return lmin < b, info
    return False, info


def vector_ok(got: Tensor, ref64: Tensor, ref32: Tensor | None, dtype: torch.dtype):
    """``||q - q_ref|| <= 100 (eps ||q_ref|| + (eps / eps32) ||q_ref32 - q_ref||)``.

    The second term is the condition factor, measured: how far the same
    quantity computed by dense autodiff in float32 lands from float64.
    """
    got64 = got.to(F64).reshape(ref64.shape)
    if not torch.isfinite(got64).all():
        return False, {"error": math.inf}
    err = float(torch.linalg.vector_norm(got64 - ref64))
    rn = float(torch.linalg.vector_norm(ref64))
    noise = 0.0
    if ref32 is not None:
        dn = torch.linalg.vector_norm(ref32.to(F64).reshape(ref64.shape) - ref64)
        noise = float(dn) if torch.isfinite(dn) else rn / EPS[F32]
    lim = 100.0 * (EPS[dtype] * rn + EPS[dtype] / EPS[F32] * noise)
    return err <= lim, {"error": err, "ref_norm": rn, "limit": lim}
