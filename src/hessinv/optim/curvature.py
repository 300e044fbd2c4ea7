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
  SVD ``A = U S V^T`` (``O((N o)^2 W)``, :class:`hessinv.kernel.GaussNewtonKernel`)
  gives ``G = V diag(S^2) V^T`` with eigenvalue ``0`` on the complement of
  ``V``'s columns; singular values are accurate to ``eps |A|``, so ``S^2`` is,
  unlike the eigenvalues of the formed kernel ``A A^T``. Every shift is ``O(N o W)``.
* ``"lifted"``: one pivoted factorization of the lifted system per shift
  (linear in depth, for ``W`` too large for a dense matrix); see
  :mod:`.factored`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..ggn import GaussNewton
from ..hessian import Hessian
from ..kernel import GaussNewtonKernel, loss_output_hessians
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


def output_split(model: nn.Module, loss_func: Callable) -> tuple[nn.Module, Callable]:
    """``(net, loss_of_output)``: where the network ends for the Gauss-Newton matrix.

    As :func:`hessinv.ggn.output_split`: a final ``nn.LogSoftmax`` followed by
    ``nn.NLLLoss`` is read as cross-entropy on the logits (the literal split would
    give a zero Gauss-Newton matrix, NLL being linear in the log-probabilities), so
    the kernel route agrees with ``hessinv.GaussNewton`` (the dense route).
    """
    if (
        isinstance(model, nn.Sequential)
        and len(model) > 0
        and isinstance(model[-1], nn.LogSoftmax)
        and isinstance(loss_func, nn.NLLLoss)
    ):
        head, log_softmax = model[:-1], model[-1]
        return head, lambda out, y: loss_func(log_softmax(out), y)
    return model, loss_func


def output_jacobian(model: nn.Module, params: list[Tensor], X: Tensor) -> tuple[Tensor, Tensor]:  # noqa: N803
    """``(outputs, J (N, o, W))``: one forward pass, then one backward pass per output row.

    The ``N o`` backward passes run as one batched backward
    (``torch.autograd.grad(..., is_grads_batched=True)``, a ``vmap`` over the
    rows of the identity): 1.0 ms against 1.4 ms for ``vmap(jacrev)`` per sample
    (:func:`hessinv.kernel.output_jacobian`) on the ``W = 321``, ``N = 24``
    benchmark net, one thread; that one also works on the traced pipeline, whose
    construction (``hessinv.GaussNewton``) costs another 2 ms, and the target is a
    whole Levenberg-Marquardt step in 5 ms.
    Parameters the output does not depend on get zero columns.
    """
    with torch.enable_grad():
        out = model(X)
        rows = out.reshape(-1)
        m = rows.numel()
        eye = torch.eye(m, dtype=rows.dtype, device=rows.device)
        grads = torch.autograd.grad(
            rows, params, eye, is_grads_batched=True, allow_unused=True, materialize_grads=True
        )
    jac = torch.cat([gr.reshape(m, -1) for gr in grads], 1)
    n = out.shape[0] if out.dim() else 1
    return out.detach(), jac.reshape(n, m // max(n, 1), -1).detach()


def kernel_spectrum(
    model: nn.Module,
    params: list[Tensor],
    loss_func: Callable,
    X: Tensor,  # noqa: N803
    y: Tensor,
    scale: float,
) -> Spectrum:
    """Gauss-Newton ``scale * B^T B`` from the thin SVD of ``B = Lambda^{1/2} J``.

    One implementation with the library: the loss Hessians in the outputs and their
    checks (:func:`hessinv.kernel.loss_output_hessians`: a loss coupling samples is
    refused), the PSD square root and the SVD (:class:`hessinv.kernel.GaussNewtonKernel`);
    only ``J`` is built here (:func:`output_jacobian`).

    Raises:
        ValueError: The loss has negative curvature in the outputs (its Gauss-Newton
            matrix is not PSD), or couples samples.
    """
    net, loss_out = output_split(model, loss_func)
    out, jac = output_jacobian(net, params, X)
    lam = loss_output_hessians(lambda q: loss_out(q, y), out)
    kern = GaussNewtonKernel(jac, lam * scale)
    if not kern.psd:
        raise ValueError(
            "curvature='gauss-newton': the loss has negative curvature in the model's "
            f"outputs (min eigenvalue {kern.psd_ratio:.2e} times the largest); its "
            "Gauss-Newton matrix is not positive semi-definite. Use a convex loss or "
            "curvature='hessian'."
        )
    s2, v = kern.svd()
    how = f"thin SVD of the {kern.n * kern.o} x {kern.w} Gauss-Newton factor (hessinv.kernel)"
    return Spectrum(s2.flip(0), v.flip(1), kern.w, how=how)
