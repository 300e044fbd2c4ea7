"""The curvature of one batch, decomposed once per step.

Four routes, chosen by :func:`choose_route`:

* ``"dense"``: the exact ``W x W`` matrix (``hessinv.Hessian.to_dense`` or
  ``hessinv.GaussNewton.to_dense``: ``W`` exact products, linear in depth) and
  one Cholesky per trial shift (:mod:`.cholesky`), with ``eigh`` as the
  fallback for the trust region's hard case;
* ``"eigh"``: the same matrix and one ``eigh`` per step; every shift is then
  ``O(W^2)`` (:mod:`.spectral`).
* ``"kernel"`` (Gauss-Newton only): ``G = A^T A`` with
  ``A = Lambda^{1/2} J``, ``J`` the ``(N o) x W`` per-sample output Jacobian and
  ``Lambda`` the block-diagonal Hessian of the loss in the outputs. One thin
  SVD ``A = U S V^T`` (``O((N o)^2 W)``) gives ``G = V diag(S^2) V^T`` with
  eigenvalue ``0`` on the complement of ``V``'s columns; singular values are
  accurate to ``eps |A|``, so ``S^2`` is, unlike the eigenvalues of the
  formed kernel ``A A^T``. Every shift is ``O(N o W)``.
* ``"lifted"``: one pivoted factorization of the lifted system per shift
  (linear in depth, for ``W`` too large for a dense matrix); see
  :mod:`.factored`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev

from ..derivatives import comb_jacobian
from ..ggn import GaussNewton
from ..hessian import Hessian
from .spectral import Spectrum

ROUTES = ("auto", "dense", "eigh", "kernel", "lifted")
DENSE_MAX_W = 2500  # eigh of W = 2500 costs about 2 s on one core; beyond it, factor


def choose_route(route: str, curvature: str, num_params: int, rows: int) -> str:
    """The route for ``W = num_params`` and ``N o = rows`` Jacobian rows."""
    if route == "kernel" and curvature != "gauss-newton":
        raise ValueError("route='kernel' needs curvature='gauss-newton'")
    if route != "auto":
        return route
    if curvature == "gauss-newton" and rows <= num_params and rows <= DENSE_MAX_W:
        return "kernel"
    return "dense" if num_params <= DENSE_MAX_W else "lifted"


def operator(curvature: str, model: nn.Module, loss_func: Callable, X: Tensor, y: Tensor):  # noqa: ANN201, N803
    """``hessinv.Hessian`` or ``hessinv.GaussNewton`` of the batch."""
    cls = Hessian if curvature == "hessian" else GaussNewton
    return cls(model, loss_func, X, y)


def dense_spectrum(op: Hessian, scale: float) -> Spectrum:
    """``eigh`` of ``scale * C`` from its exact dense matrix."""
    c = op.to_dense() * scale
    w, q = torch.linalg.eigh(c)
    return Spectrum(w, q, op.num_params, how="eigh of the dense matrix")


def output_jacobian(model: nn.Module, params: list[Tensor], X: Tensor) -> tuple[Tensor, Tensor]:  # noqa: N803
    """``(outputs (N, o), J (N, o, W))`` of the model at its current parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def f(v: Tensor) -> Tensor:
        d, i = {}, 0
        for k, s in zip(keys, shapes, strict=True):
            n = s.numel()
            d[k] = v[i : i + n].reshape(s)
            i += n
        out = functional_call(model, d, (X,))
        return out.reshape(out.shape[0], -1)

    with torch.no_grad():
        out = f(flat)
    return out, jacrev(f)(flat)


def loss_curvature_sqrt(loss_func: Callable, out: Tensor, y: Tensor, shape: torch.Size) -> Tensor:
    """``Lambda_n^{1/2}`` ``(N, o, o)``: the per-sample Hessian of the loss in the outputs.

    Raises:
        ValueError: if some ``Lambda_n`` has a negative eigenvalue (a non-convex loss,
            whose Gauss-Newton matrix is not positive semi-definite).
    """
    n, o = out.shape

    def loss_flat(yf: Tensor) -> Tensor:
        return loss_func(yf.reshape(shape), y).reshape(())

    lam = comb_jacobian(grad(loss_flat), out, o)  # (N, o, o)
    lam = 0.5 * (lam + lam.transpose(1, 2))
    d, v = torch.linalg.eigh(lam)
    top = float(d.abs().max()) if d.numel() else 0.0
    if float(d.min()) < -o * torch.finfo(d.dtype).eps * 16 * max(top, 1e-300):
        raise ValueError(
            "curvature='gauss-newton': the loss has negative curvature in the model's "
            f"outputs (min eigenvalue {float(d.min()):.2e}); its Gauss-Newton matrix is not "
            "positive semi-definite. Use a convex loss or curvature='hessian'."
        )
    return (v * d.clamp(min=0.0).sqrt().unsqueeze(1)) @ v.transpose(1, 2)


def kernel_spectrum(
    model: nn.Module,
    params: list[Tensor],
    loss_func: Callable,
    X: Tensor,  # noqa: N803
    y: Tensor,
    scale: float,
) -> Spectrum:
    """Gauss-Newton ``scale * A^T A`` from the thin SVD of ``A = Lambda^{1/2} J``."""
    with torch.no_grad():
        shape = model(X).shape
    out, jac = output_jacobian(model, params, X)
    root = loss_curvature_sqrt(loss_func, out, y, shape)
    a = (root @ jac).reshape(-1, jac.shape[-1]) * scale**0.5
    w_num = jac.shape[-1]
    if a.shape[0] <= 2 * w_num:
        _, sv, vh = torch.linalg.svd(a, full_matrices=False)
        w, q = (sv**2).flip(0), vh.flip(0).T
        how = f"thin SVD of the {a.shape[0]} x {w_num} Gauss-Newton factor (kernel form)"
    else:
        w, q = torch.linalg.eigh(a.T @ a)
        how = f"eigh of A^T A from the {a.shape[0]} x {w_num} Gauss-Newton factor"
    return Spectrum(w, q, w_num, how=how)
