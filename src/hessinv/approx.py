"""Bishop's Hessian approximations, each beside the exact quantity it stands in for.

==========================================  ============================  ===================
approximation (Bishop, *Deep Learning* 8.1)  here                          exact counterpart
==========================================  ============================  ===================
diagonal (Becker & LeCun 1989), ``O(W)``     :func:`becker_lecun_diagonal`  ``H.diagonal()``
outer product / Gauss-Newton (eq. 8.39)      :class:`GaussNewton`           ``Hessian``
sequential inverse of the outer product      :func:`outer_product_inverse`  ``GaussNewton.inverse``
finite differences                           :mod:`hessinv.check`           ``H @ v``, blocks
==========================================  ============================  ===================
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .diagonal import becker_lecun_diagonal as _bl
from .ggn import GaussNewton
from .hessian import Hessian

__all__ = ["GaussNewton", "becker_lecun_diagonal", "outer_product_inverse"]


def becker_lecun_diagonal(H: Hessian) -> Tensor:  # noqa: N803
    """Becker & LeCun's diagonal approximation of ``H`` (cost ``O(W)``).

    Propagates the loss curvature backward keeping only its diagonal; compare
    with the exact ``H.diagonal()`` (cost ``O(sum_l N a_l^2 p_l)``).
    """
    return _bl(H.blocks)


def output_jacobian(model: nn.Module, X: Tensor) -> Tensor:  # noqa: N803
    """``J``, ``(N, K, W)``: the per-sample Jacobian of the flattened output (dense)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def f(ps: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(model, ps, (X,)).reshape(X.shape[0], -1)

    jac = torch.func.jacrev(f)(params)
    return torch.cat([jac[n].reshape(*jac[n].shape[:2], -1) for n in names], dim=2)


def outer_product_inverse(
    model: nn.Module,
    loss_func: Callable[..., Tensor],
    X: Tensor,  # noqa: N803
    y: Tensor,
    damping: float,
) -> Tensor:
    """``(G + damping I)^{-1}`` by the sequential (Sherman-Morrison) update, dense ``W x W``.

    Bishop's sequential procedure for the outer-product approximation: with
    ``Lambda_n = sum_k mu_k q_k q_k^T`` (``mu_k >= 0``), ``G = sum_{n,k} c c^T`` with
    ``c = sqrt(mu_k) J_n^T q_k``, and each rank-one term updates the inverse

        ``B <- B - (B c)(B c)^T / (1 + c^T B c)``,  starting from ``B = I / damping``.

    Cost ``O(N K W^2)`` time and ``O(W^2)`` memory (``K`` the output width): for
    small networks. ``GaussNewton(...).solve`` is exact and linear in depth.

    Raises:
        ValueError: ``damping <= 0`` or a loss curvature that is not PSD.
    """
    if not damping > 0:
        raise ValueError("the sequential inverse starts from I / damping: damping must be > 0")
    out = model(X).detach()
    n = out.shape[0]
    yf = out.reshape(n, -1)

    def loss_flat(t: Tensor) -> Tensor:
        return loss_func(t.reshape(out.shape), y)

    lam = torch.func.hessian(loss_flat)(yf)  # (N, K, N, K), block diagonal over samples
    idx = torch.arange(n)
    lam = lam[idx, :, idx, :]  # (N, K, K)
    mu, q = torch.linalg.eigh(0.5 * (lam + lam.transpose(1, 2)))
    if float(mu.min()) < -1e-10 * max(1.0, float(mu.abs().max())):
        raise ValueError("the loss curvature is not positive semi-definite")
    J = output_jacobian(model, X)  # (N, K, W)
    W = J.shape[2]
    B = torch.eye(W, dtype=J.dtype, device=J.device) / damping
    cs = torch.einsum("nkw,nkj->njw", J, q) * mu.clamp_min(0).sqrt().unsqueeze(-1)
    for c in cs.reshape(-1, W):
        bc = B @ c
        B = B - torch.outer(bc, bc) / (1.0 + c @ bc)
    return 0.5 * (B + B.T)
