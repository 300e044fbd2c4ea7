"""Cholesky stage pass: the backward Riccati recursion over the stages of ``H``.

The lifted system is the KKT matrix of a linear-quadratic control problem
(a discrete-time LQ control problem): states ``u_l`` (``M_l = N a_l`` numbers), controls
``v_l``, dynamics ``u_l = Jz_l u_{l-1} + Jx_l v_l`` (``u_{-1} = 0``) and stage
cost ``1/2 v^T (Txx_l + dI) v + v^T Tzx_l^T u_{l-1} + 1/2 u_{l-1}^T Tzz_l u_{l-1}``;
``1/2 v^T (H + dI) v`` is the total cost (paper eq. 24 read as a sum over
stages, :mod:`hessinv.products`). With ``P`` the Hessian of the cost-to-go in
the state entering stage ``l + 1`` (``P = 0`` after the last stage)::

    Q_vv = Txx_l + dI + Jx_l^T P Jx_l        (k_l x k_l, the pivot)
    Q_vu = Tzx_l^T + Jx_l^T P Jz_l           (k_l x M_{l-1})
    Q_uu = Tzz_l + Jz_l^T P Jz_l             (M_{l-1} x M_{l-1})
    P   <- Q_uu - Q_uv Q_vv^{-1} Q_vu

This is block Gaussian elimination of ``H + dI`` eliminating ``v_{L-1},
v_{L-2}, ..., v_0`` in turn: ``Q_vv`` is the diagonal block of the current
Schur complement. Hence (Haynsworth) ``inertia(H + dI) = sum_l inertia(Q_vv)``
while the pivots are nonsingular, ``log det(H + dI) = sum_l log det Q_vv``,
and ``H + dI`` is positive definite **exactly when every** ``Q_vv`` **is**.
Parameter directions outside the basis ``Q_l`` of :mod:`hessinv.lifted` are
eigenvectors with eigenvalue ``d`` and are added at the end.

**Rounding and the certificate.** Everything below is computed for the stage
blocks as given (the ``H`` hessinv represents). Let ``e_l`` bound the error of
the computed pivot ``fl(Q_vv)`` against the exact ``Q_vv`` of the given
blocks. It has two parts, both tracked at run time, with ``g_l = (n_l + 4)
eps`` and ``n_l = p_l + M_l + M_{l-1} + k_l`` the longest inner dimension of
stage ``l``'s products:

* this stage's rounding ``r_l`` (``|fl(A B) - A B|_F <= g |A|_F |B|_F``):
  ``g (|Txx| + |d| sqrt(k) + 2 |Jx|^2 |P|)`` plus the backward error of the
  Cholesky (or ``eigh``) of the pivot, ``(k + 4) eps |Q_vv|`` (Frobenius);
* the error ``E`` of the computed ``P`` carried in from later stages, bounded
  in the Loewner order by a positive semidefinite majorant ``-B <= E <= B``:
  it contributes ``|Jx^T B Jx|_F``. ``B`` is carried to the next ``P`` by the
  exact Schur-complement perturbation formula: ``P <- Q_uu - Q_uv Q_vv^{-1}
  Q_vu`` changes by ``A^T E A - G^T (Q_vv + Jx^T E Jx)^{-1} G`` with the
  closed loop ``A = Jz - Jx K``, ``K = Q_vv^{-1} Q_vu``, ``G = Jx^T E A``, so
  ``B <- A^T B A + (|Jx^T B Jx| |A^T B A| / gap + r (1 + |K|)^2 (1 + r / gap)
  + rounding of Q_uu - Y^T Y) I`` (``gap``: the pivot's smallest
  ``|eigenvalue|`` less ``e_l``; the stage's rounding ``r`` is a perturbation
  of its cost matrix ``[[Q_vv, Q_vu], [Q_uv, Q_uu]]``). A matrix majorant,
  not a norm: norms of products of closed-loop maps would compound
  exponentially with depth (measured: a depth-32 tanh net's norm bound grew
  to 1e3 where the matrix one stays at 4e-9).

Equivalently, the computed pivots are exactly those of ``H + dI + E_H``,
``E_H = sum_l R_l^T D_l R_l``, where ``D_l`` perturbs stage ``l``'s cost
matrix by its rounding and ``R_l = d (v_l, u_{l-1}) / d v`` is the forward
sensitivity: a backward error of the size the dense ``H`` itself carries
from eq. 24 (relative to the terms ``|Jx|^2 |P|`` it is summed from, not to
``|H + dI|``); ``e_l`` bounds its effect on each
pivot. The decisions (a factor 2 over ``e_l`` covers what the bound neglects:
the rounding of ``K`` and of the closed loop ``A``, and of the bound itself):

* ``positive_definite`` is True only if every pivot's smallest eigenvalue
  (bounded below by ``1 / |L^{-1}|_F^2`` from its Cholesky factor ``L``, or
  ``eigvalsh`` when that bound is too weak) exceeds ``2 e_l`` (and ``d > 0``
  when directions were dropped). By Weyl each exact pivot is then positive
  definite, so ``H + dI`` is.
* ``pd_status`` is False when a pivot has an eigenvalue below ``-2 e_l``
  while every earlier pivot was separated (``min |lambda| > 2 e``): the exact
  Schur complement is then not positive semidefinite. None when undecided.
* ``reliable`` is True when every pivot's eigenvalues are farther than
  ``2 e_l`` from zero: the inertia count is then exact for the given blocks,
  an independent congruence that can verify another factorization's count.

Every threshold is relative: for the loss times ``c`` and damping ``c d``
every block, ``P``, ``e_l`` and eigenvalue scales by ``c`` and the decisions
are unchanged.

Cost per stage: ``O(M_l^2 k_l + M_l k_l^2 + k_l^3 + N^2 a_l^2 a_{l-1} +
M_{l-1} (M_l + k_l)^2 + M_l^2 M_{l-1})`` (the last term and half the first
are the majorant ``B``) (``P`` couples the samples: it is a dense ``M x M``
matrix), linear in depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .derivatives import StageBlocks
from .lifted import _block_diag
from .lifted_bases import Projected, _basis, project_on
from .riccati_result import RiccatiResult, _Pivot, _Stage

if TYPE_CHECKING:  # pragma: no cover
    from .stage_split import SplitStage

__all__ = ["RiccatiResult", "riccati_pass"]

MARGIN = 2.0  # factor over the error bound e_l that a decision needs
MODES = ("cholesky", "inertia")


def _fro(t: Tensor | None) -> float:
    return 0.0 if t is None else float(torch.linalg.vector_norm(t))


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.T)


def _check_input(blocks: list[StageBlocks], damping: float, bases: list | None, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"riccati_pass: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise ValueError("riccati_pass: blocks must be a non-empty list of StageBlocks")
    if not all(isinstance(b, StageBlocks) for b in blocks):
        raise TypeError("riccati_pass: every item of blocks must be a StageBlocks")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise TypeError(f"riccati_pass: damping must be a real number, got {type(damping)}")
    if not math.isfinite(damping):
        raise ValueError(f"riccati_pass: damping must be finite, got {damping}")
    if bases is not None and len(bases) != len(blocks):
        raise ValueError(f"riccati_pass: {len(bases)} bases for {len(blocks)} stages")
    if not blocks[0].grad_x.dtype.is_floating_point:
        raise TypeError("riccati_pass: the stage blocks must be floating point")


def _jz_t_p_jz(jz: Tensor, p: Tensor) -> Tensor:
    """``Jz^T P Jz`` for block-diagonal ``Jz`` (``(N, a, a_in)``) and dense ``P`` (``N a``)."""
    n, a, a_in = jz.shape
    p4 = p.reshape(n, a, n, a)
    left = torch.einsum("nsi,nsmt->nimt", jz, p4)
    return torch.einsum("nimt,mtj->nimj", left, jz).reshape(n * a_in, n * a_in)


def _add_block_diag(q: Tensor, blocks: Tensor) -> Tensor:
    """``q + blockdiag(blocks)`` for per-sample ``blocks`` (``(N, a, a)``); ``q`` is overwritten."""
    n, a, _ = blocks.shape
    q = q.contiguous()
    q4 = q.view(n, a, n, a)
    torch.diagonal(q4, dim1=0, dim2=2).add_(blocks.permute(1, 2, 0))
    return q


def stage_pivot(
    txx: Tensor | None,
    jx: Tensor | None,
    p_mat: Tensor | None,
    damping: float,
    k: int,
    ref: Tensor,
    kron: SplitStage | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``Q_vv = Txx + dI + Jx^T P Jx`` (symmetrized), and ``P Jx`` (None without ``P``).

    ``kron``: a factored split stage whose ``J_1`` is ``jx``; its structured
    products (:meth:`~hessinv.stage_split.SplitStage.p_jx`, ``jx_t``) replace
    the two dense ones.
    """
    qvv = torch.eye(k, dtype=ref.dtype, device=ref.device) * damping
    if txx is not None:
        qvv = qvv + txx
    pjx = None
    if p_mat is not None and jx is not None:
        pjx = p_mat @ jx if kron is None else kron.p_jx(p_mat)
        qvv = qvv + (jx.T @ pjx if kron is None else kron.jx_t(pjx))
    return _sym(qvv), pjx


def stage_coupling(
    b: StageBlocks, tzx: Tensor | None, pjx: Tensor | None, p_mat: Tensor | None, k: int
) -> tuple[Tensor, Tensor]:
    """``Q_vu = Tzx^T + Jx^T P Jz`` (``k x M_{l-1}``) and ``Q_uu = Tzz + Jz^T P Jz``."""
    n, a_in = b.shape_of("Tzx")[:2]  # type: ignore[index]
    m_in = n * a_in
    ref = b.grad_x
    qvu = ref.new_zeros(k, m_in) if tzx is None else tzx.T
    quu = ref.new_zeros(m_in, m_in)
    if pjx is not None:
        n, a, _ = b.Jz.shape
        qvu = qvu + (b.Jz.mT @ pjx.reshape(n, a, k)).reshape(m_in, k).T  # (Jz^T P Jx)^T
        quu = _jz_t_p_jz(b.Jz, p_mat)
    if b.Tzz is not None:
        quu = _add_block_diag(quu, b.Tzz)
    return qvu, quu


def _next_majorant(
    b_mat: Tensor | None,
    b_ok: bool,
    *,
    closed_loop: Tensor | None,
    c_vv: float,
    fresh: float,
    n_k: float,
    gap: float,
    rounding: float,
    m_in: int,
    ref: Tensor,
) -> tuple[Tensor | None, bool]:
    """The Loewner majorant of the error of the next ``P`` (see the module doc).

    With ``-B <= E <= B`` for the error ``E`` of the computed ``P`` and the
    closed loop ``A = Jz - Jx K``, the exact Schur-complement perturbation
    ``A^T E A - G^T (Q_vv + Jx^T E Jx)^{-1} G`` (``G = Jx^T E A``) is bounded
    by ``A^T B A + |Jx^T B Jx| |A^T B A| / gap``, where ``gap`` is a lower bound
    of the smallest ``|eigenvalue|`` of ``Q_vv + Jx^T E Jx``; the stage's own
    rounding ``r`` (a perturbation of the stage's cost matrix) adds
    ``r (1 + |K|)^2 (1 + r / gap)`` and the final ``Q_uu - Y^T Y`` its rounding.
    """
    if not b_ok or not gap > 0 or not math.isfinite(n_k):
        return None, False
    scalar = fresh * (1 + n_k) ** 2 * (1 + fresh / gap) + rounding
    eye = torch.eye(m_in, dtype=ref.dtype, device=ref.device)
    if b_mat is None:
        return scalar * eye, True
    aba = closed_loop.T @ b_mat @ closed_loop
    scalar += c_vv * _fro(aba) / gap
    return _sym(aba) + scalar * eye, True


def _kept(b: StageBlocks, q: Tensor | Projected | None) -> int:
    """``k_l``: the stage's kept directions for a basis or a projection (``p_l`` for ``None``)."""
    if isinstance(q, Projected):
        return q.k(b.num_params)
    return b.num_params if q is None else q.shape[1]


def riccati_pass(  # noqa: C901, PLR0912, PLR0915
    blocks: list[StageBlocks],
    damping: float,
    bases: Sequence[Tensor | Projected | None] | None = None,
    *,
    mode: str = "cholesky",
    stop_unreliable: bool = False,
) -> RiccatiResult:
    """Backward Riccati recursion over the stages: a PD certificate, inertia and logdet.

    Args:
        blocks: The stage blocks (``Hessian(...).blocks``).
        damping: The shift ``d``.
        bases: Per stage the kept basis ``Q_l`` (``p_l x k_l``) or None (all
            parameters), or the stage's :class:`~hessinv.lifted_bases.Projected`
            blocks (the lifted system's: its ``Q_l`` is then formed only if a
            solve reads it); by default ``lifted._basis`` of each stage.
        mode: ``"cholesky"``: factor each pivot by Cholesky and stop at the
            first that fails (the cheap PD test and solve). ``"inertia"``:
            ``eigvalsh`` of every pivot and go on through indefinite ones (an
            independent inertia count; unstable when a pivot is near singular,
            which ``reliable`` reports).
        stop_unreliable: Stop at the first pivot within ``MARGIN e_l`` of
            singular (``reliable`` is then False and ``inertia`` None): for a
            caller that uses the count only when it is certified, the rest of
            the pass would be wasted.

    Returns:
        A :class:`RiccatiResult`; its ``solve`` works when ``positive_definite``.
    """
    _check_input(blocks, damping, bases, mode)
    d = float(damping)
    if bases is None:
        bases = [_basis(b) for b in blocks]
    ref = blocks[0].grad_x
    eps = torch.finfo(ref.dtype).eps
    n_st = len(blocks)
    stages: list[_Stage] = [None] * n_st  # type: ignore[list-item]
    margins: list[float] = [math.nan] * n_st
    errors: list[float] = [math.nan] * n_st
    eigs: list[Tensor | None] = [None] * n_st
    pos = neg = zero = 0
    sign, logabs = 1.0, 0.0
    pd_status: bool | None = True
    failed: int | None = None
    separated = True  # every pivot so far: min |lambda| > MARGIN * e
    stopped = False
    p_mat: Tensor | None = None  # cost-to-go Hessian in the state entering stage l + 1
    b_mat: Tensor | None = None  # Loewner majorant: -B <= fl(P) - P <= B (None: B = 0)
    b_ok = True  # False once B could not be bounded (a pivot not separated from singular)
    for l in reversed(range(n_st)):  # noqa: E741
        b, q = blocks[l], bases[l]
        pl = b.num_params
        k = _kept(b, q)
        # the lifted system's projection (given, or found by its basis when it has one)
        pr = q if isinstance(q, Projected) else project_on(b, q)
        m_out = 0 if l == n_st - 1 else b.rows("Jx")
        m_in = 0 if l == 0 else b.rows("Tzx")
        gam = (pl + m_out + m_in + k + 4) * eps
        jx = None if l == n_st - 1 else pr.jx
        tzx = None if l == 0 else pr.tzx
        txx = pr.txx
        n_jx, n_p = _fro(jx), _fro(p_mat)
        qvv, pjx = stage_pivot(txx, jx, p_mat, d, k, ref)
        if not bool(torch.isfinite(qvv).all()):  # overflow (or NaN blocks): undecided
            pd_status = None if pd_status is True else pd_status
            failed = l if failed is None else failed
            stopped, separated = True, False
            break
        # fresh rounding of this stage (Frobenius: elementwise product bounds), then the
        # error carried in through P, E -> Jx^T E Jx (spectral norms)
        r_vv = gam * (_fro(txx) + abs(d) * math.sqrt(k) + 2 * n_jx**2 * n_p)
        r_vv += (k + 4) * eps * _fro(qvv)  # backward error of the pivot's Cholesky / eigh
        c_vv = 0.0 if b_mat is None else _fro(jx.T @ b_mat @ jx)  # |Jx^T E Jx| <= it
        e_vv = r_vv + c_vv if b_ok else math.inf
        thresh = MARGIN * e_vv
        # -- the pivot: Cholesky (mode "cholesky") or eigh ------------------------
        piv, lam_min, lam_abs_min, vals = _Pivot(), math.nan, math.nan, None
        chol_ok = False
        if k == 0:  # no kept direction here: an empty pivot, vacuously definite
            lam_min = lam_abs_min = math.inf
            vals = qvv.new_zeros(0)
            piv.chol, piv.vecs, piv.vals = qvv, qvv, vals
            chol_ok = mode == "cholesky"
        elif mode == "cholesky":
            chol, info = torch.linalg.cholesky_ex(qvv)
            if int(info) == 0 and bool(torch.isfinite(chol).all()):
                linv = torch.linalg.solve_triangular(
                    chol, torch.eye(k, dtype=ref.dtype, device=ref.device), upper=False
                )
                lam_min = 1.0 / float(torch.linalg.vector_norm(linv)) ** 2  # lower bound
                chol_ok, piv.chol = True, chol
            if not chol_ok or not lam_min > thresh:  # too weak a bound, or failed: eigvalsh
                vals = torch.linalg.eigvalsh(qvv)
                lam_min = float(vals.min())
            lam_abs_min = lam_min if chol_ok else float(vals.abs().min())
        else:
            vals, vecs = torch.linalg.eigh(qvv)
            lam_min, lam_abs_min = float(vals.min()), float(vals.abs().min())
            piv.vecs, piv.vals = vecs, vals
        margins[l] = lam_abs_min / e_vv if e_vv > 0 else math.inf
        errors[l] = e_vv
        eigs[l] = vals if mode == "inertia" else None
        # -- decisions --------------------------------------------------------------
        if k and not math.isfinite(lam_min):
            pd_status, failed, stopped, separated = None, l, True, False
            break
        if pd_status is True and not lam_min > thresh:
            failed = l
            pd_status = False if (lam_min < -thresh and separated) else None
        if not lam_abs_min > thresh:
            separated = False
            if stop_unreliable:
                stopped = True
                break
        if mode == "cholesky" and not chol_ok:
            stopped = True
            break
        # -- inertia and logdet of this pivot ---------------------------------------
        if mode == "cholesky":
            pos += k
            logabs += 2 * float(torch.log(torch.diagonal(piv.chol)).sum())
        else:
            pos += int((vals > 0).sum())
            neg += int((vals < 0).sum())
            zero += int((vals == 0).sum())
            logabs += float(torch.log(vals.abs()).sum())
            sign *= -1.0 if int((vals < 0).sum()) % 2 else 1.0
        if l == 0:
            stages[l] = _Stage(piv, None, jx, q)
            break
        # -- P update -----------------------------------------------------------------
        n_tzx, n_jz = _fro(tzx), _fro(b.Jz)
        qvu, quu = stage_coupling(b, tzx, pjx, p_mat, k)
        if chol_ok:  # positive definite pivot: Y = L^{-1} Q_vu, P = Q_uu - Y^T Y
            y = torch.linalg.solve_triangular(piv.chol, qvu, upper=False)
            kmat = torch.linalg.solve_triangular(piv.chol.T, y, upper=True)
            p_new = quu - y.T @ y
            n_y2 = _fro(y) ** 2
        else:  # eigh: Z = V^T Q_vu, P = Q_uu - Z^T diag(1/lam) Z
            z = piv.vecs.T @ qvu
            zl = z / piv.vals.unsqueeze(1)
            kmat = piv.vecs @ zl
            p_new = quu - z.T @ zl
            n_y2 = float((z * zl).abs().sum())
            y = (z / piv.vals.clamp_min(0).sqrt().unsqueeze(1)) if lam_min > 0 else None
        n_k = _fro(kmat)
        b_mat, b_ok = _next_majorant(
            b_mat,
            b_ok,
            closed_loop=None if b_mat is None else _block_diag(b.Jz) - jx @ kmat,
            c_vv=c_vv,
            fresh=r_vv
            + 2 * gam * (n_tzx + 2 * n_jx * n_p * n_jz)
            + gam * (_fro(b.Tzz) + 2 * n_jz**2 * n_p),
            n_k=n_k,
            gap=lam_abs_min - e_vv,
            rounding=gam * n_y2 + 2 * eps * (_fro(quu) + n_y2),
            m_in=m_in,
            ref=ref,
        )
        p_mat = _sym(p_new)
        stages[l] = _Stage(piv, y, jx, q)
        if not bool(torch.isfinite(p_mat).all()):
            pd_status, separated, stopped = (None if pd_status else pd_status), False, True
            failed = l if failed is None else failed
            break
    # -- dropped directions: eigenvalue d each ------------------------------------------
    nd = sum(b.num_params for b in blocks) - sum(
        _kept(b, q) for b, q in zip(blocks, bases, strict=True)
    )
    if nd and d <= 0:  # exact eigenvalues d <= 0: proven not positive definite
        pd_status = False
    if stopped:
        inertia, logdet = None, None
    else:
        dp, dn, dz = (nd, 0, 0) if d > 0 else ((0, nd, 0) if d < 0 else (0, 0, nd))
        inertia = (pos + dp, neg + dn, zero + dz)
        if nd:
            logabs += nd * math.log(abs(d)) if d != 0 else -math.inf
            sign *= -1.0 if (d < 0 and nd % 2) else 1.0
        logdet = (0.0 if (zero + dz) else sign, logabs)
    return RiccatiResult(
        positive_definite=pd_status is True,
        pd_status=pd_status,
        failed_stage=failed,
        inertia=inertia,
        reliable=separated and not stopped,
        logdet=logdet,
        margins=margins,
        errors=errors,
        pivot_eigvals=eigs,
        mode=mode,
        damping=d,
        blocks=list(blocks),
        _stages=stages,
    )
