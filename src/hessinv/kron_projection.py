"""Kept bases and projected blocks of a run of Linear stages, from their factors, batched.

For a Linear stage ``y_n = W z_n + c`` with a diagonal tail (Jacobian ``s_n``,
curvature ``Tg_n``, cotangent ``b_n = b_y,n``; :class:`~hessinv.derivatives.blocks.KronX`)
and its Kronecker kept basis ``Q = [I_a (x) Q_T, Q_B (x) Q_C]``
(:meth:`~hessinv.derivatives.blocks.KronX.kept_basis`; ``t_n = [z_n; 1]``,
``u_n = Q_T^T t_n`` and ``Q_C^T t_n = 0``), the projected blocks of
:class:`hessinv.lifted.Projected` have closed forms (rows and columns in
Kronecker order ``(q, i)``; ``B_n = (I_a (x) t_n^T) Q = [I_a (x) u_n^T, 0]``)::

    Jx_n Q   = diag(s_n) [I_a (x) u_n^T, 0]
    Tzx_n Q  = [W^T diag(Tg_n) (I_a (x) u_n^T) + (b_n^T (x) Q_T[:a_in]),
                (b_n^T Q_B) (x) Q_C[:a_in]]
    Q^T Txx Q = sum_n B_n^T diag(Tg_n) B_n = blockdiag_q(sum_n Tg_n[q] u_n u_n^T) (+) 0

(``Tzx_n = W^T Tg_n (I_a (x) t_n^T) + [b_n (x) I_a_in, 0]``, whose second
term's rows are ``b_n[q] e_i``). A run of stages with equal shapes gets them
in a few batched products, where the dense route forms ``Q`` (``p x k``) and
multiplies the dense ``Jx``, ``Tzx`` and ``Txx`` by it per stage: the default
solve then never reads those dense blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .derivatives import StageBlocks
from .derivatives.kron_basis import KronBasis


def factored_stage(b: StageBlocks) -> bool:
    """A Linear stage whose projections :func:`project_run` can form from the factors.

    Its factors are complete (``W``, ``b_y`` and a diagonal tail Jacobian ``s``),
    in the blocks' dtype and device, and its tail curvature is diagonal or
    zero (``Tg`` of shape ``(N, a)`` or ``None``), with ``Txx`` theirs alone.
    """
    k = b.kron_x
    if k is None or not k.factors_of(b) or (k.tg is not None and k.tg.dim() != 2):
        return False
    return k.tg is not None or b.txx_zero


def run_key(b: StageBlocks) -> tuple:
    """Stages with equal keys stack in :func:`project_run`."""
    k = b.kron_x
    assert k is not None
    return (
        tuple(k.z.shape),
        k.a,
        k.bias,
        b.has("Tzx"),
        b.has("Jx"),
        k.tg is None,
        b.grad_x.dtype,
        b.grad_x.device,
    )


def project_run(
    blocks: list[StageBlocks],
) -> list[tuple[KronBasis, Tensor | None, Tensor | None, Tensor | None]]:
    """Per stage ``(basis, Q^T Txx Q, Jx Q, Tzx Q)`` for stages with one :func:`run_key`.

    The same basis as :meth:`~hessinv.derivatives.blocks.KronX.kept_basis` (QRs
    batched over the run), the blocks by the module doc's closed forms.
    ``Jx Q`` is ``(N a, k)``, ``Tzx Q`` is ``(N a_in, k)`` (``None`` for the
    first and last stage as the dense blocks), ``Q^T Txx Q`` is ``(k, k)``
    (``None`` for a zero tail curvature).
    """
    kr = [b.kron_x for b in blocks]
    k0, b0 = kr[0], blocks[0]
    assert k0 is not None
    x = torch.stack([k.inputs() for k in kr])  # (n, N, c)
    n, n_s, c = x.shape
    a, a_in = k0.a, k0.z.shape[1]
    rz = min(n_s, c)
    qfull = torch.linalg.qr(x.mT, mode="complete")[0]  # (n, c, c)
    qt, qc = qfull[..., :rz], qfull[..., rz:]
    with_tzx = b0.has("Tzx")
    by = torch.stack([k.b_y for k in kr]) if with_tzx else None  # (n, N, a)
    if with_tzx and rz < c:
        qb = torch.linalg.qr(by.mT, mode="reduced")[0]  # (n, a, r_B)
    else:
        qb = x.new_zeros(n, a, 0)
    rb = qb.shape[2]
    k1, k2 = a * rz, rb * (c - rz)
    u = x @ qt  # (n, N, r_z): u_n = Q_T^T t_n
    tg = None if k0.tg is None else torch.stack([k.tg for k in kr])  # (n, N, a)

    jx = None
    if b0.has("Jx"):
        s = torch.stack([k.s for k in kr])  # (n, N, a)
        d = x.new_zeros(n, n_s, a, a, rz)
        torch.diagonal(d, dim1=2, dim2=3).copy_(s.unsqueeze(2) * u.unsqueeze(3))
        jx = torch.cat([d.reshape(n, n_s * a, k1), x.new_zeros(n, n_s * a, k2)], dim=2)

    tzx = None
    if with_tzx:
        first = qt[:, None, :a_in, None, :] * by[:, :, None, :, None]  # (n, N, a_in, a, r_z)
        if tg is not None:
            wt = torch.stack([k.weight for k in kr]).mT  # (n, a_in, a)
            wtg = wt.unsqueeze(1) * tg.unsqueeze(2)  # (n, N, a_in, a): W^T diag(Tg_n)
            first = first + wtg.unsqueeze(-1) * u[:, :, None, None, :]
        second = (by @ qb)[:, :, None, :, None] * qc[
            :, None, :a_in, None, :
        ]  # (n, N, a_in, r_B, .)
        tzx = torch.cat(
            [first.reshape(n, n_s * a_in, k1), second.reshape(n, n_s * a_in, k2)], dim=2
        )

    txx = None
    if tg is not None:
        tu = (tg.unsqueeze(-1) * u.unsqueeze(2)).reshape(n, n_s, a * rz)  # Tg_n[q] u_n[r]
        blk = (tu.mT @ u).reshape(n, a, rz, rz)  # sum_n Tg_n[q] u_n u_n^T (a 2-operand product:
        # a 3-operand einsum's path search leaves cyclic garbage)
        txx = x.new_zeros(n, k1 + k2, k1 + k2)
        part = txx[:, :k1, :k1].unflatten(1, (a, rz)).unflatten(3, (a, rz))  # (n, q, r, q', r')
        torch.diagonal(part, dim1=1, dim2=3).copy_(blk.permute(0, 2, 3, 1))

    order, inverse = k0.order(), k0.inverse_order()
    out = []
    for i in range(n):
        basis = KronBasis(qt[i], qc[i], qb[i], order, inverse, k0.bias)
        out.append(
            (
                basis,
                None if txx is None else txx[i],
                None if jx is None else jx[i],
                None if tzx is None else tzx[i],
            )
        )
    return out
