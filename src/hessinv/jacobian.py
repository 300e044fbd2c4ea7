"""Per-sample Jacobians of a network's output in its parameters, verified or refused.

``J_n = d y_n / d theta`` (``o x W`` per sample, ``y_n`` the output of sample
``n`` for the whole batch as input) is what the Gauss-Newton kernel
(:mod:`hessinv.kernel`) is built from. Two ways to compute it:

* **per sample** (fast): ``vmap`` over samples of ``jacrev`` of the network
  run on one sample, ``o`` vector-Jacobian products in all. Exact only if the
  network treats samples independently *and* every op's batching rule is
  right for a batched input; neither always holds: a first stage may mix
  samples (hessinv accepts that, :func:`hessinv.trace.check_no_mixing`), a
  traced forward may fix shapes for the batch size, and torch 2.13's batching
  rule of ``prelu``'s backward returns wrong weight gradients under ``vmap``
  over the input (no error).
* **on the whole batch**: ``jacrev`` of the batch's output ``(N, o)``: ``N o``
  vector-Jacobian products on the whole batch (``vmap`` over cotangents only),
  ``N`` times the cost of the per-sample route; exact whether or not samples mix.

:func:`output_jacobian` takes the per-sample route, checks it, and falls
back to the whole batch if the check fails; the fallback is checked too, and
a Jacobian that fails both checks is refused. The check compares with plain
reverse mode on the whole batch (one ``vjp``, no ``vmap``): the values
``y_n``, and ``J^T c = sum_n J_n^T c_n`` for a random cotangent ``c``, which
differs for any wrong ``J`` with probability one; both agree to round-off
(``JAC_CHECK_RTOL eps`` relative to ``|J|^T |c|``) when ``J`` is right.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jacrev, vjp, vmap

#: The check's tolerance on ``|J^T c - vjp(c)|``, in units of ``eps (|J|^T |c|)_max``.
JAC_CHECK_RTOL = 1e3

NetOfFlat = Callable[[Tensor, Tensor], Tensor]


def per_sample_jacobian(
    net: NetOfFlat, flat: Tensor, z0: Tensor, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(y, J)`` by ``vmap`` over samples: ``y`` ``(N, o)``, ``J`` ``(N, o, W)`` (unchecked).

    Args:
        net: ``net(flat, z) -> y``, the network output (batch first) as a
            function of the flat parameters, for a batch ``z``.
        flat: The flat parameters ``theta`` (``W``).
        z0: The inputs, batch first.
        chunk_size: Samples per vectorized chunk (``None``: all at once).
    """

    def one(f: Tensor, x: Tensor) -> Tensor:
        return net(f, x.unsqueeze(0)).reshape(-1)

    y = vmap(one, in_dims=(None, 0), chunk_size=chunk_size)(flat.detach(), z0)
    jac = vmap(jacrev(one), in_dims=(None, 0), chunk_size=chunk_size)(flat.detach(), z0)
    return y.detach(), jac.detach()


def batch_jacobian(
    net: NetOfFlat, flat: Tensor, z0: Tensor, chunk_size: int | None = None
) -> Tensor:
    """``J`` ``(N, o, W)`` by ``jacrev`` of the whole batch's output (``N o`` cotangents).

    Args:
        net: As :func:`per_sample_jacobian`.
        flat: The flat parameters.
        z0: The inputs, batch first.
        chunk_size: Cotangents per vectorized chunk (``None``: all at once).
    """
    n = z0.shape[0]

    def out(f: Tensor) -> Tensor:
        return net(f, z0).reshape(n, -1)

    return jacrev(out, chunk_size=chunk_size)(flat.detach()).detach()


def jacobian_mismatch(
    net: NetOfFlat, flat: Tensor, z0: Tensor, y: Tensor | None, jac: Tensor
) -> float:
    """How far ``jac`` (and ``y``) are from plain reverse mode, in units of the tolerance.

    Returns ``max(|J^T c - vjp(c)|) / (JAC_CHECK_RTOL eps max(|J|^T |c|))`` for a
    random cotangent ``c`` (seeded), or ``inf`` if the values ``y`` or the
    shapes differ; at most 1 means the check passes.
    """
    n = z0.shape[0]
    fl = flat.detach()
    out, pull = vjp(lambda f: net(f, z0).reshape(n, -1), fl)
    out = out.detach()
    if tuple(jac.shape) != (*out.shape, fl.numel()):
        return float("inf")
    eps = torch.finfo(jac.dtype).eps
    if y is not None:
        if y.shape != out.shape:
            return float("inf")
        dy = float((y - out).abs().max()) if out.numel() else 0.0
        scale_y = float(out.abs().max()) if out.numel() else 0.0
        if dy > JAC_CHECK_RTOL * eps * max(scale_y, 1e-300):
            return float("inf")
    gen = torch.Generator(device="cpu").manual_seed(0)
    c = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    ref = pull(c)[0].detach()
    mine = torch.einsum("naw,na->w", jac, c)
    bound = torch.einsum("naw,na->w", jac.abs(), c.abs())
    scale = float(bound.max()) if bound.numel() else 0.0
    diff = float((mine - ref).abs().max()) if ref.numel() else 0.0
    return diff / (JAC_CHECK_RTOL * eps * max(scale, 1e-300))


def output_jacobian(
    net: NetOfFlat, flat: Tensor, z0: Tensor, chunk_size: int | None = None
) -> Tensor:
    """Per-sample Jacobians ``J_n = d y_n / d theta`` of shape ``(N, o, W)``, checked.

    The per-sample route if it passes the check, else the whole-batch route if
    that passes (module doc).

    Args:
        net: ``net(flat, z) -> y``, the network output (batch first) as a
            function of the flat trainable parameters, for a batch ``z``.
        flat: The flat parameters ``theta`` (``W``).
        z0: The inputs, batch first.
        chunk_size: Samples (per-sample route) or cotangents (whole batch) per
            vectorized chunk (``None``: all at once).

    Raises:
        torch.linalg.LinAlgError: Neither route agrees with plain reverse mode
            (an op whose derivatives disagree between its batched and plain forms).
    """
    try:
        y, jac = per_sample_jacobian(net, flat, z0, chunk_size)
        if jacobian_mismatch(net, flat, z0, y, jac) <= 1.0:
            return jac
    except (RuntimeError, ValueError, IndexError, TypeError):
        pass  # a forward that needs the whole batch (fixed shapes, mixing): whole batch
    jac = batch_jacobian(net, flat, z0, chunk_size)
    bad = jacobian_mismatch(net, flat, z0, None, jac)
    if bad > 1.0:
        raise torch.linalg.LinAlgError(
            "the Jacobian of the network output disagrees with reverse mode on the whole batch "
            f"({bad:.1e} times the round-off tolerance), per sample and for the whole batch: "
            "some op's batched (vmap) derivative differs from its plain one, so GaussNewton "
            "cannot form J exactly; write that op from elementary operations"
        )
    return jac
