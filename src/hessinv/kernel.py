"""The kernel form of the Gauss-Newton matrix: exact solves, log-determinant and inertia.

The Gauss-Newton matrix of a network with per-sample output Jacobians ``J_n``
(``o x W``, ``o`` the output width) and per-sample loss Hessians in the
outputs ``L_n`` (``o x o``, positive semi-definite for MSE, cross-entropy,
BCE-with-logits) is ``G = sum_n J_n^T L_n J_n = B^T B`` with
``B = L^{1/2} J`` (``N o x W``; ``L_n^{1/2}`` the symmetric square root). So the
eigenvalues of ``G`` are the squared singular values of ``B`` plus
``W - N o`` zeros, and with the thin SVD ``B = U S V^T`` (``k = min(N o, W)``
singular values), for every shift ``lam`` (negative too)::

    (G + lam I)^{-1} g = V diag(1 / (s^2 + lam)) V^T g + (g - V V^T g) / lam
    det(G + lam I)     = prod_i (s_i^2 + lam) * lam^(W - k)

(the second term and the power are absent when ``k = W``). This is the push-through
(Woodbury) identity ``(G + lam I)^{-1} = (I - B^T (lam I + B B^T)^{-1} B) / lam``
written so that it also holds at ``lam = 0`` when ``B`` has full column rank.
One SVD, ``O(N o W min(N o, W))``, serves every ``lam``; ``J`` costs about one
backward pass per output coordinate (:func:`hessinv.jacobian.output_jacobian`).

**Thresholds.** As every factorization of :mod:`hessinv.solvers`, an
eigenvalue ``mu`` of ``G + lam I`` (``s_i^2 + lam``, or ``lam`` itself for the
``W - k`` directions outside ``B``'s row space) counts as zero when
``|mu| <= W eps max(||G + lam I||, ||G|| + |lam|)`` (:func:`hessinv.solvers.zero_threshold`;
both norms known exactly here). The SVD is backward stable:
the computed ``s_i`` are exact for a ``B`` perturbed by about ``eps ||B||``, so
``s_i^2`` carries an absolute error of order ``eps s_max s_i <= eps ||G||``, well
inside the band. ``solve`` refuses (:class:`~hessinv.errors.SingularHessianError`)
when any eigenvalue is zero in that sense; ``inertia`` counts it as zero;
``logdet`` returns ``(0, -inf)``.
The loss Hessian must be positive semi-definite: an eigenvalue of ``L_n`` below
``-100 o eps max_n ||L_n||`` means a non-convex loss, and the kernel route
raises ``ValueError`` (use ``method="lifted"``); eigenvalues above that bound
are round-off of a PSD matrix and are set to zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import vjp

from .derivatives import comb_jacobian
from .errors import HINT, SingularHessianError
from .jacobian import output_jacobian
from .mixing import batch_splits, on_side
from .solvers.base import Factorization, Inertia

__all__ = [
    "GaussNewtonKernel",
    "KernelFactorization",
    "kernel_cost",
    "loss_output_hessians",
    "output_jacobian",
    "psd_sqrt",
]

VectorLike = Tensor | Sequence[Tensor]

#: Eigenvalues of ``L_n`` below ``-L_PSD_RTOL * o * eps * max_n ||L_n||`` reject the kernel route.
L_PSD_RTOL = 100.0


def loss_output_hessians(loss: Callable[[Tensor], Tensor], y: Tensor) -> Tensor:
    """Per-sample Hessians ``L_n`` (``(N, o, o)``) of a loss in the network outputs.

    ``o`` Hessian-vector products with comb directions (:func:`hessinv.derivatives.comb_jacobian`),
    then two checks that make them exact or refused: the loss must not couple
    samples (for each split of the batch by a bit of the sample index, a product
    with a direction on one side must vanish on the other:
    :func:`hessinv.mixing.batch_splits`) and ``L_n`` must be symmetric (to ``1e3 eps`` relative).

    Raises:
        ValueError: The loss couples samples, or its Hessian is not symmetric.
    """
    n = y.shape[0]
    o = y[0].numel()
    shape = y.shape

    def grad_flat(yf: Tensor) -> Tensor:
        return torch.func.grad(lambda q: loss(q.reshape(shape)).reshape(()))(yf)

    yf = y.detach().reshape(n, o)
    lam = comb_jacobian(grad_flat, yf, o)  # (N, o, o): lam[n, a, :] = row a of L_n
    eps = torch.finfo(y.dtype).eps
    scale = float(lam.abs().max()) if lam.numel() else 0.0
    if n > 1:
        _, pull = vjp(grad_flat, yf)
        gen = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(yf.shape, generator=gen, dtype=yf.dtype).to(yf.device)
        leak = ref = 0.0
        for side in batch_splits(n, yf.device):  # every pair of samples separated once
            out = pull(on_side(noise, side))[0]
            leak = max(leak, float(out[~side].abs().max()))
            ref = max(ref, float(out[side].abs().max()))
        if leak > 1e3 * eps * max(scale, ref, 1e-300):
            raise ValueError(
                "the loss couples samples (its Hessian in the outputs is not block diagonal "
                f"by sample: leak {leak:.2e}); the Gauss-Newton kernel needs a loss that is "
                "a sum or mean of per-sample terms"
            )
    asym = float((lam - lam.transpose(1, 2)).abs().max()) if lam.numel() else 0.0
    if asym > 1e3 * eps * max(scale, 1e-300):
        raise ValueError(
            f"the loss Hessian in the outputs is not symmetric (asymmetry {asym:.2e} against "
            f"{scale:.2e}): its second derivatives are wrong (e.g. a fused op with a bad "
            "double backward); write the loss from elementary operations"
        )
    return 0.5 * (lam + lam.transpose(1, 2))


def psd_sqrt(lam: Tensor) -> tuple[Tensor | None, float]:
    """Symmetric square roots ``L_n^{1/2}`` of per-sample PSD matrices.

    Returns:
        ``(root, ratio)``: ``root`` of shape ``(N, o, o)``, or ``None`` when some
        eigenvalue is below ``-L_PSD_RTOL o eps max_n ||L_n||`` (not PSD);
        ``ratio`` is the most negative eigenvalue over the largest magnitude.
    """
    w, q = torch.linalg.eigh(lam)
    top = float(w.abs().max()) if w.numel() else 0.0
    low = float(w.min()) if w.numel() else 0.0
    ratio = low / top if top > 0 else 0.0
    o = lam.shape[-1]
    if low < -L_PSD_RTOL * o * torch.finfo(lam.dtype).eps * top:
        return None, ratio
    root = (q * w.clamp_min(0).sqrt().unsqueeze(1)) @ q.transpose(1, 2)
    return root, ratio


class GaussNewtonKernel:
    """``G = J^T L J`` held as ``B = L^{1/2} J`` (or as ``J``, ``L`` when ``L`` is indefinite).

    Args:
        jac: Per-sample output Jacobians ``(N, o, W)``.
        lam: Per-sample loss Hessians in the outputs ``(N, o, o)``, symmetric.
    """

    def __init__(self, jac: Tensor, lam: Tensor) -> None:
        self.n, self.o, self.w = jac.shape
        self.dtype = jac.dtype
        root, self.psd_ratio = psd_sqrt(lam)
        self.psd = root is not None
        self.B: Tensor | None = None
        self.J: Tensor | None = None
        self.L: Tensor | None = None
        if root is not None:
            self.B = (root @ jac).reshape(self.n * self.o, self.w)
        else:
            self.J, self.L = jac, lam
        self._svd: tuple[Tensor, Tensor] | None = None

    def require_psd(self) -> Tensor:
        """``B``; raise ``ValueError`` if the loss Hessian is not PSD."""
        if self.B is None:
            raise ValueError(
                "the loss Hessian in the network outputs is not positive semi-definite "
                f"(most negative eigenvalue {self.psd_ratio:.2e} times the largest): a "
                "non-convex loss has no Gauss-Newton kernel form; use method='lifted'"
            )
        return self.B

    def matmat(self, v: Tensor) -> Tensor:
        """``G V = J^T (L (J V))`` for ``V`` of shape ``(W, k)``."""
        if self.B is not None:
            return self.B.T @ (self.B @ v)
        jv = torch.einsum("naw,wk->nak", self.J, v)
        return torch.einsum("naw,nak->wk", self.J, self.L @ jv)

    def to_dense(self) -> Tensor:
        """The ``W x W`` matrix ``G`` (exactly symmetric)."""
        if self.B is not None:
            return self.B.T @ self.B
        j = self.J.reshape(self.n * self.o, self.w)
        lj = (self.L @ self.J).reshape(self.n * self.o, self.w)
        g = j.T @ lj
        return 0.5 * (g + g.T)

    def diagonal(self) -> Tensor:
        """``diag(G)``: the squared column norms of ``B`` (``sum_n diag(J_n^T L_n J_n)``)."""
        if self.B is not None:
            return (self.B * self.B).sum(0)
        return torch.einsum("naw,naw->w", self.J, self.L @ self.J)

    def svd(self) -> tuple[Tensor, Tensor]:
        """``(s2, V)``: the squared singular values of ``B`` and its right vectors (cached)."""
        if self._svd is None:
            b = self.require_psd()
            _, s, vh = torch.linalg.svd(b, full_matrices=False)
            self._svd = (s * s, vh.T.contiguous())
        return self._svd


class KernelFactorization(Factorization):
    """``G + damping I`` through the SVD of ``B = L^{1/2} J`` (module doc).

    A :class:`hessinv.solvers.Factorization`: the protocol's solve (refinement,
    normwise backward-error check), with everything else read off the exact
    eigenvalues ``mu_i = s_i^2 + damping`` (and ``damping`` itself, ``W - k``
    times): ``||G + dI||`` exactly, the zero band ``|mu| <= W eps ||G + dI||``
    (:func:`hessinv.solvers.zero_threshold`), a verified inertia, the
    log-determinant. The SVD belongs to the operator (``op.kernel()``) and
    is shared by every damping.

    Args:
        op: An operator with ``kernel() -> GaussNewtonKernel``, ``layout``,
            ``matmat`` and ``num_params`` (a :class:`hessinv.GaussNewton`).
        damping: The shift (any finite real; ``G + dI`` is indefinite for
            some ``damping < 0``).

    Raises:
        ValueError: The loss Hessian is not PSD (use ``method="lifted"``).
    """

    method = "kernel"

    def __init__(self, op, damping: float) -> None:  # noqa: ANN001
        super().__init__(op, damping)
        self.kernel: GaussNewtonKernel = op.kernel()
        s2, self.V = self.kernel.svd()
        self.mu = s2 + self.damping
        self.k = s2.shape[0]
        self.n_extra = self.kernel.w - self.k  # directions with eigenvalue exactly ``damping``
        top = float(self.mu.abs().max()) if self.k else 0.0
        self._norm = max(top, abs(self.damping) if self.n_extra else 0.0)
        self._g_norm = float(s2.abs().max()) if self.k else 0.0  # ||G||
        self.tol = super().zero_threshold()

    def norm(self) -> float:
        """``||G + dI||_2``, exactly ``max(max_i |s_i^2 + d|, |d|)``."""
        self.op._check_fresh()
        return self._norm

    def data_norm(self) -> float:
        """``||G|| + |d|``, exactly ``max_i s_i^2 + |d|``."""
        return self._g_norm + abs(self.damping)

    def zero_threshold(self) -> float:
        """``W eps max(||G + dI||, ||G|| + |d|)`` (:meth:`Factorization.zero_threshold`)."""
        self.op._check_fresh()
        return self.tol

    def _zero_mask(self) -> Tensor:
        return self.mu.abs() <= self.tol

    def zero_count(self) -> int:
        """Eigenvalues ``mu`` with ``|mu| <= W eps ||G + dI||``."""
        self.op._check_fresh()
        if self._zero is None:
            z = int(self._zero_mask().sum())
            if self.n_extra and abs(self.damping) <= self.tol:
                z += self.n_extra
            self._zero = z
        return self._zero

    def _singular_message(self) -> str:
        extra = (
            f"; G = J^T L J has rank at most N*o = {self.kernel.n * self.kernel.o} < W = "
            f"{self.kernel.w}"
            if self.n_extra and abs(self.damping) <= self.tol
            else ""
        )
        return (
            f"G + damping*I has {self.zero_count()} eigenvalue(s) within {self.tol:.1e} "
            f"(= W eps ||G + dI||) of zero{extra}. {HINT}"
        )

    def inverse_diagonal(self) -> Tensor:
        """``diag((G + dI)^{-1})`` from the SVD, never forming the inverse.

        With ``G = V diag(s^2) V^T`` (``V`` the ``k`` right singular vectors of
        ``B``), ``(G + dI)^{-1} = V diag(1 / (s^2 + d)) V^T + (I - V V^T) / d``, so
        entry ``j`` is ``sum_i V_ji^2 / (s_i^2 + d) + (1 - sum_i V_ji^2) / d`` (the
        second term only when ``k < W``). Raises ``SingularHessianError`` like
        :meth:`solve`.
        """
        self.op._check_fresh()
        if self.zero_count():
            raise SingularHessianError(self._singular_message())
        v2 = self.V * self.V
        out = v2 @ (1.0 / self.mu)
        if self.n_extra:
            out = out + (1.0 - v2.sum(1)).clamp_min(0.0) / self.damping
        return out

    def _apply(self, g: Tensor) -> Tensor:
        """``(G + d I)^{-1} g`` for ``g`` of shape ``(W, k)``, from the SVD."""
        c = self.V.T @ g
        if not self.n_extra:
            return self.V @ (c / self.mu.unsqueeze(1))
        p = g - self.V @ c
        c2 = self.V.T @ p  # project twice: p / d must not carry range(V) round-off
        p = p - self.V @ c2
        return self.V @ ((c + c2) / self.mu.unsqueeze(1)) + p / self.damping

    def _logdet(self) -> tuple[float, float]:
        neg = int((self.mu < 0).sum()) + (self.n_extra if self.damping < 0 else 0)
        la = float(torch.log(self.mu.abs()).sum())
        if self.n_extra:
            la += self.n_extra * math.log(abs(self.damping))
        return (-1.0 if neg % 2 else 1.0), la

    def logdet(self) -> tuple[float, float]:
        """``(sign, log|det(G + damping I)|)``; ``(0, -inf)`` when numerically singular."""
        self.op._check_fresh()
        if self.zero_count():
            return 0.0, -math.inf
        return self._logdet()

    def inertia(self) -> Inertia:
        """``(pos, neg, zero)`` of ``G + damping I``; zero means ``|mu| <= W eps ||G + dI||``."""
        self.op._check_fresh()
        zero = self._zero_mask()
        pos = int(((self.mu > 0) & ~zero).sum())
        neg = int(((self.mu < 0) & ~zero).sum())
        nz = int(zero.sum())
        if self.n_extra:
            if abs(self.damping) <= self.tol:
                nz += self.n_extra
            elif self.damping > 0:
                pos += self.n_extra
            else:
                neg += self.n_extra
        how = (
            f"SVD of L^(1/2) J (eigenvalues s^2 + d, and d {self.n_extra} times); "
            f"zero band |lambda| <= {self.tol:.1e}"
        )
        return Inertia(pos, neg, nz, verified=True, how=how)

    def _signs(self) -> Inertia:
        return self.inertia()

    def _positive_definite(self) -> bool | None:
        """``True`` for ``damping > 0`` (``L`` PSD, so ``G`` is: a proof); else by the counts.

        For ``damping <= 0``: ``False`` when ``W > N o`` (``G`` has an exact null
        space, eigenvalue ``damping``) or some ``s_i^2 + d`` is below the zero
        band; ``True`` when every ``s_i^2 + d`` is above it (the band bounds the
        SVD's error); ``False`` also for an eigenvalue inside the band
        (numerically singular), as :class:`hessinv.solvers.DenseFactorization`.
        """
        if self.damping > 0:
            return True
        if self.n_extra:
            return False
        inert = self.inertia()
        return inert.negative == 0 and inert.zero == 0

    @staticmethod
    def estimate(op) -> dict[str, float]:  # noqa: ANN001
        """Flops and bytes of building the kernel route for ``op`` from scratch (no ``J`` formed).

        ``op.kernel_cost()`` (:meth:`hessinv.GaussNewton.kernel_cost`), i.e.
        :func:`kernel_cost`; for ``method="auto"`` to weigh against other routes.
        """
        return op.kernel_cost()

    def cost(self) -> dict[str, float]:
        """This factorization's own cost once the SVD exists: per solve column and stored."""
        w, no = self.kernel.w, self.kernel.n * self.kernel.o
        return {
            "flops_per_rhs": 4.0 * w * self.k + 4.0 * no * w,
            "bytes": float(self.V.numel() * self.V.element_size()),
        }


def kernel_cost(n: int, o: int, w: int, forward_flops: float, itemsize: int) -> dict[str, float]:
    """Flops and bytes of the kernel route from scratch.

    ``J``: one forward pass and ``o`` backward passes (``2 F`` each, ``F`` the
    forward flops); ``B = L^{1/2} J``: ``2 N o^2 W``; the thin SVD of the
    ``N o x W`` matrix ``B``: ``4 m n k + 8 k^3`` (``k = min(m, n)``).
    Memory: ``J`` and ``B`` (``N o W`` each) plus the SVD's ``U`` and ``V``.
    """
    m = n * o
    k = min(m, w)
    flops = (1 + 2 * o) * forward_flops + 2.0 * n * o * o * w + 4.0 * m * w * k + 8.0 * k**3
    nbytes = float(itemsize) * (2.0 * m * w + k * (m + w))
    return {"flops": flops, "bytes": nbytes}
