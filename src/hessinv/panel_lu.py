r"""Pivoted LU of a tall panel, the inner step of :class:`hessinv.blocktri.BlockTriLU`.

``P A = L U`` for an ``m x n`` panel ``A`` (``m >= n``) with partial pivoting
(LAPACK's ``getrf``), returned as the packed ``L \\ U`` (``m x n``), the row
permutation ``perm`` (``A[perm] = L U``) and the number of row interchanges
(the sign of ``det``), all as tensors on ``A``'s device.

This is LAPACK's ``getrf`` on the CPU and cuSOLVER's on CUDA (:func:`getrf`).
torch's default CUDA route for one tall matrix is MAGMA's hybrid ``getrf``,
which factors each panel on the host: about 5x slower for the lifted blocks of
1024 to 2300 rows (``benchmarks/results/factor_rate_cuda.md``).

:func:`recursive_lu` is Toledo's recursive LU (the algorithm of LAPACK's
``getrf2``): with ``A = [A_1, A_2]`` split by columns,

1. ``P_1 A_1 = [L_11; L_21] U_11`` (recursively),
2. ``U_12 = L_11^{-1} (P_1 A_2)_top`` (a triangular solve),
3. ``S = (P_1 A_2)_bot - L_21 U_12`` (a matrix product),
4. ``P_2 S = L_22 U_22`` (recursively), and ``L_21 <- P_2 L_21``,

so that all but the leaves' ``O(m n b)`` flops are matrix products. It is the
same partial pivoting (the same pivot chosen at every column, in exact
arithmetic), so the same stability bounds hold. The permutations compose on
the device: ``perm = [perm_1[:n_1], perm_1[n_1:][perm_2]]``, and the parity of
the product is the sum of the parities, so the swap counts add. Measured on an
H100 it does not beat cuSOLVER's ``getrf`` at these sizes (each leaf's
``getrf`` costs about as much as a whole panel's: the panel step is bound by
latency, not flops), so :func:`panel_lu` does not use it; it is kept, tested,
as the route a faster leaf factorization would plug into, and the benchmark
times it beside the others.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

#: Columns below which :func:`recursive_lu` calls ``getrf`` directly.
LEAF = 256


def perm_from_pivots(piv: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """LAPACK 1-based row interchanges -> row permutation and swap count, as tensors.

    ``A[perm] = L U``. On the CPU the interchanges are applied in Python (no
    device to synchronize with); elsewhere :func:`perm_on_device` keeps
    everything on the device, so the stage loop never waits for the host.
    """
    if piv.device.type != "cpu":
        return perm_on_device(piv, m)
    perm = list(range(m))
    swaps = 0
    for i, p in enumerate(piv.tolist()):
        j = p - 1
        if j != i:
            perm[i], perm[j] = perm[j], perm[i]
            swaps += 1
    return (
        torch.tensor(perm, dtype=torch.long, device=piv.device),
        torch.tensor(swaps, device=piv.device),
    )


def perm_on_device(piv: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """:func:`perm_from_pivots` without leaving the device (no host synchronization).

    ``lu_unpack`` applies the interchanges to the identity on the device:
    ``A = P L U``, so row ``i`` of ``L U`` is row ``perm[i] = argmax_j P[j, i]`` of ``A``.
    Every interchange ``i <-> piv_i - 1`` with ``piv_i - 1 != i`` is one transposition.
    """
    k = piv.shape[0]
    p_mat, _, _ = torch.lu_unpack(piv.new_zeros(m, k, dtype=torch.float32), piv, unpack_data=False)
    perm = p_mat.argmax(dim=0)
    swaps = (piv - 1 != torch.arange(k, device=piv.device)).sum()
    return perm, swaps


#: The CUDA library for ``getrf``: torch's default routes a single tall matrix to
#: MAGMA, whose hybrid ``getrf`` factors each panel on the host (about 1 ms per call
#: even for ``2048 x 32``, measured on an H100); cuSOLVER's runs on the device.
CUDA_BACKEND = "cusolver"


_BACKEND_LOCK = threading.Lock()


def getrf(a: Tensor, backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    r"""LAPACK's (or on CUDA, ``backend``'s) ``getrf``: packed ``L \\ U``, ``perm``, swap count.

    Args:
        a: ``m x n`` matrix.
        backend: ``"cusolver"``, ``"magma"`` or ``"default"`` (torch's choice)
            for a CUDA tensor; ``None``: :data:`CUDA_BACKEND`. Ignored on the CPU.
    """
    if a.device.type == "cuda":
        chosen = CUDA_BACKEND if backend is None else backend
        # torch has no per-call choice: the global preference is flipped around the call,
        # under a lock so that hessinv's own threads never see each other's choice (linalg
        # calls of other code running in other threads at that moment may see it)
        with _BACKEND_LOCK:
            before = torch.backends.cuda.preferred_linalg_library()
            torch.backends.cuda.preferred_linalg_library(chosen)
            try:
                lu, piv, _ = torch.linalg.lu_factor_ex(a)
            finally:
                torch.backends.cuda.preferred_linalg_library(before)
    else:
        lu, piv, _ = torch.linalg.lu_factor_ex(a)
    perm, swaps = perm_from_pivots(piv, a.shape[0])
    return lu, perm, swaps


def recursive_lu(
    a: Tensor, leaf: int = LEAF, backend: str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Recursive partial-pivoting LU of ``a`` (``m x n``, ``m >= n``); see the module.

    Args:
        a: The panel (not modified).
        leaf: Panels of at most this many columns go to :func:`getrf`.
        backend: The leaves' ``getrf`` library on CUDA (:func:`getrf`).

    Returns:
        ``(lu, perm, swaps)`` as :func:`getrf`.
    """
    m, n = a.shape
    if n <= leaf:
        return getrf(a, backend)
    n1 = max(leaf, (n // 2) // leaf * leaf)  # leaves of full width where possible
    lu1, p1, s1 = recursive_lu(a[:, :n1], leaf, backend)
    right = a[p1, n1:]
    u12 = torch.linalg.solve_triangular(lu1[:n1], right[:n1], upper=False, unitriangular=True)
    lu2, p2, s2 = recursive_lu(torch.addmm(right[n1:], lu1[n1:], u12, alpha=-1.0), leaf, backend)
    out = a.new_empty(m, n)
    out[:n1, :n1] = lu1[:n1]
    out[n1:, :n1] = lu1[n1:][p2]
    out[:n1, n1:] = u12
    out[n1:, n1:] = lu2
    return out, torch.cat([p1[:n1], p1[n1:][p2]]), s1 + s2


def panel_lu(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``P A = L U`` of a panel by the fastest exact route measured for its device.

    LAPACK's ``getrf`` on the CPU, cuSOLVER's on CUDA (:func:`getrf`).
    """
    return getrf(a)
