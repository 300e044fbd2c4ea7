"""Inertia and positive definiteness of ``H + dI`` from the lifted factorization.

* First the stage Riccati pass (:func:`hessinv.riccati.riccati_pass`, a block
  LDL^T of ``H + dI`` itself, eliminating ``v_{L-1}, ..., v_0``): when every
  pivot is separated from singular by more than twice its running error
  bound, its count is exact for the given blocks (Haynsworth) and is
  returned as verified, at the cost of one pass (less than the
  factorization). The pass stops at the first pivot it cannot vouch for
  (near singular: common on indefinite ``H``).
* After a solve that trusted the stage elimination (:mod:`hessinv.riccati_solve`):
  its Bunch-Kaufman pivot signs, whose parity and ``log|det|`` must agree with
  the same pivots' LUs, verified by the stage solve being a near inverse of
  ``H + dI`` (``||I - (H + dI) G||_2 < 1``, bounded from four random probes:
  one solve and one product, :mod:`hessinv.solvers.near_inverse`), else by one
  delayed-pivot congruence of ``K`` (:func:`hessinv.blocktri.block_tri_inertia`)
  that agrees on every count and on the determinant.
* Otherwise ``inertia(H + dI) = inertia(K) - (m, m, 0)`` plus the dropped
  directions (Sylvester, Haynsworth), from a congruence of ``K`` built front
  by front whose determinant must match the block LU's, *verified* by a
  second, different congruence: the same delayed-pivot LDL^T of ``K``
  eliminated in the opposite block order (last block first: different
  pivots, different fronts), whose determinant must also match the LU's.
  When only the reversed one matches (many eigenvalues of ``K`` near zero,
  whose logarithms each congruence resolves to a few digits), the
  first-to-last attempts that missed the determinant verify its counts if
  they agree on every one. A
  parity check alone cannot tell two misclassified eigenvalues apart; two
  different congruences that agree on every count can.
* Off the CPU the first two routes swap: the Riccati pass decides with host
  reads per stage (its running error bounds, the stop at the first pivot it
  cannot vouch for), a device synchronization per stage on a GPU, while the
  near-inverse witness reads a few scalars for the whole chain. Both counts
  are verified, so the order changes the cost, not the answer
  (:data:`RICCATI_FIRST_DEVICES`).
* Positive definiteness: proven by the Riccati pass, ``H + dI > 0`` exactly
  when every stage pivot has a Cholesky factor with a margin above its error
  bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..blocktri import BlockTriLU, InertiaResult, block_tri_inertia
from ..errors import LiftedPrecisionError
from ..lifted import LiftedSystem, _LazyBlocks
from ..lifted_merge import MergedBlocks
from ..riccati import RiccatiResult, riccati_pass
from ..riccati_solve import StageRiccati
from .base import Inertia
from .near_inverse import (
    PROBE_COLUMNS,
    PROBE_FAILURE,
    near_inverse_bound,
    probes,
    verifies,
)

#: Device types on which the inertia tries the certified Riccati pass before the stage
#: elimination's near-inverse witness (elsewhere after it: the pass reads the host per stage).
RICCATI_FIRST_DEVICES = frozenset({"cpu"})

#: The most bytes of ``K``'s blocks built once and held for the two congruences of an inertia.
CONGRUENCE_BLOCKS_BYTES = 512 * 2**20

_Blocks = tuple[Sequence[Tensor], Sequence[Tensor]]


class LiftedInertia:
    """The inertia half of :class:`hessinv.solvers.lifted.LiftedFactorization` (a mixin).

    Uses the factorization's ``system``, ``merged``, ``lu``, ``m``, ``op``,
    ``damping``, ``stage_solver`` and its trust (``_trust``, ``_settle_trust``).
    """

    system: LiftedSystem
    merged: MergedBlocks
    lu: BlockTriLU
    m: int
    damping: float
    stage_solver: StageRiccati | None
    _trust: bool | None
    _congruence: InertiaResult | None
    _congruence_reversed: bool
    _unmatched: list[InertiaResult]
    _riccati: dict[str, RiccatiResult]

    def _require_regular_lu(self, what: str) -> None:
        if not (self.lu.min_pivot > 0.0 and math.isfinite(self.lu.min_pivot)):
            raise LiftedPrecisionError(
                f"cannot compute the {what} of H + damping*I (damping={self.damping:g}) from the "
                "lifted system: its LU has a zero pivot although H + damping*I is not known to "
                "be singular. Exploding activations or Jacobians make the lifted system far "
                "worse conditioned than H. Use method='dense' (small W) or a larger damping."
            )

    def congruence(self, blocks: _Blocks | None = None) -> InertiaResult:
        """The congruence ``K = X diag(w) X^T`` of :func:`block_tri_inertia` (cached).

        Sign-only counting (``rtol=0``; ``K`` is nonsingular by the LU): first
        Bunch-Kaufman fronts with delayed pivots (threshold ``0.01``, at most
        ``max_k n_k`` carried directions), then orthogonal fronts with the same
        cap, then threshold ``0.1`` with no cap; the first whose determinant
        agrees with the LU's (sign exactly, ``log|det|`` to ``0.1 + sqrt(eps)
        |log|det||``) is kept. When none does (a nearly singular ``K``, whose
        smallest eigenvalues each elimination resolves to a few digits), the
        same attempts eliminating the blocks last to first
        (:meth:`reversed_congruence`); when none of those agrees either,
        :class:`~hessinv.errors.LiftedPrecisionError`.

        ``blocks``: ``K``'s merged blocks already built (:meth:`_built_blocks`);
        by default they are built as each attempt reads them.
        """
        if self._congruence is None:
            self._require_regular_lu("inertia")
            r = self._first_congruence(self.lu.slogdet(), blocks)
            self._congruence_reversed = r is None
            if r is None:
                r = self.reversed_congruence(blocks)
            if r is None:
                raise LiftedPrecisionError(
                    "no congruence of the lifted system agrees with the determinant of its "
                    f"pivoted LU (smallest pivot {self.lu.min_pivot:.1e}, largest entry "
                    f"{self.lu.scale:.1e}): the lifted system is too badly conditioned to count "
                    "signs. Use method='dense' (small W) or a larger damping."
                )
            self._congruence = r
        return self._congruence

    def _first_congruence(
        self,
        reference: tuple[float, float],
        blocks: _Blocks | None = None,
        *,
        reverse: bool = False,
    ) -> InertiaResult | None:
        """The first congruence attempt whose determinant is ``reference`` (None: none is).

        ``reference``: ``(sign, log|det K'|)`` to agree with (:meth:`_agrees`).
        Attempts: Bunch-Kaufman fronts, then orthogonal fronts (both threshold
        0.01, at most ``max_k n_k`` carried directions), then (not ``reverse``)
        threshold 0.1 with four times the cap. ``reverse``: the blocks
        eliminated last to first.
        """
        ls = self.merged
        diag, upper = (ls.diag, ls.upper) if blocks is None else blocks
        n = len(ls.sizes)
        if reverse:
            d0, u0 = diag, upper
            diag = _LazyBlocks(n, lambda i: d0[n - 1 - i])
            upper = _LazyBlocks(n - 1, lambda i: u0[n - 2 - i].T)
        cap = max(ls.sizes)
        attempts: list[dict] = [
            {"alpha": 0.01, "max_carry": cap, "pivoting": "ldl"},
            {"alpha": 0.01, "max_carry": cap},
        ]
        if not reverse:
            attempts.append({"alpha": 0.1, "max_carry": 4 * cap})
        for kw in attempts:
            r = block_tri_inertia(diag, upper, rtol=0.0, **kw)
            if self._agrees(r, reference):
                return r
            if not reverse:
                self._unmatched.append(r)
        return None

    def reversed_congruence(self, blocks: _Blocks | None = None) -> InertiaResult | None:
        """The same congruence of ``K`` with the blocks eliminated last to first.

        ``P K P^T`` (block order reversed) has the inertia and determinant of
        ``K``; its fronts and delayed pivots are different. ``None`` when no
        attempt agrees with the LU's determinant. ``blocks`` as for
        :meth:`congruence`.
        """
        return self._first_congruence(self.lu.slogdet(), blocks, reverse=True)

    def _agrees(self, r: InertiaResult, reference: tuple[float, float]) -> bool:
        """``r``'s determinant is ``reference`` (``K``'s working precision's ``eps``).

        The sign exactly, ``log|det|`` to ``0.1 + sqrt(eps) |log|det||``.
        """
        if r.zero:
            return False
        return self._agrees_det(r.sign, r.logabsdet, *reference)

    def _agrees_det(self, sign: float, logabs: float, ref_sign: float, ref_logabs: float) -> bool:
        """Equal signs, ``log|det|`` to ``0.1 + sqrt(eps) |log|det||`` (:meth:`_agrees`)."""
        dtype = self.system.dtype or self.system.blocks[0].grad_x.dtype
        tol = 0.1 + math.sqrt(torch.finfo(dtype).eps) * abs(ref_logabs)
        return sign == ref_sign and abs(logabs - ref_logabs) <= tol

    def riccati(self, mode: str = "inertia") -> RiccatiResult:
        """The stage Riccati pass of ``H + damping I`` (cached per mode).

        In ``"inertia"`` mode it stops at the first pivot it cannot certify
        (only a certified count is used).
        """
        if mode not in self._riccati:
            self._riccati[mode] = riccati_pass(
                self.op.blocks,
                self.damping,
                self.system.projections,
                mode=mode,
                stop_unreliable=mode == "inertia",
            )
        return self._riccati[mode]

    def _positive_definite(self) -> bool | None:
        """The Riccati pass's verdict: proven PD, proven not PD, or ``None``."""
        return self.riccati("cholesky").pd_status

    def _certified_riccati(self) -> Inertia | None:
        """The stage Riccati pass's count, when it certifies it (else ``None``)."""
        ric = self.riccati("inertia")
        if ric.reliable and ric.inertia is not None:
            how = (
                "the stage Riccati pass: a block LDL^T congruence of H + damping*I whose every "
                "pivot is separated from singular by more than twice its running error bound"
            )
            return Inertia(*ric.inertia, verified=True, how=how)
        return None

    def _consistent_counts(self, r: InertiaResult) -> tuple[int, int] | None:
        """``(n_pos, n_neg)`` of ``H + dI`` from a congruence of ``K`` (Sylvester, Haynsworth).

        ``None`` when the congruence is inconsistent with ``K``'s structure (a zero,
        or fewer than ``m`` eigenvalues of either sign).
        """
        pos, neg = r.positive - self.m, r.negative - self.m
        if pos < 0 or neg < 0 or r.zero:
            return None
        dp, dn, _ = self.system.dropped_inertia()
        return pos + dp, neg + dn

    def _congruence_counts(self, r: InertiaResult) -> tuple[int, int]:
        """:meth:`_consistent_counts`, raising where the congruence is inconsistent."""
        counts = self._consistent_counts(r)
        if counts is None:
            raise LiftedPrecisionError(
                "the congruence of the lifted system is inconsistent (K is too badly "
                "conditioned to count signs): use method='dense' or a larger damping."
            )
        return counts

    def _negatives(self) -> int:
        """The certified Riccati count, else the first congruence's (no reversed one).

        The band count of :meth:`Factorization.zero_count` decides with the
        count alone; the reversed congruence only verifies it and would cost
        as much again.
        """
        ric = self._certified_riccati()
        if ric is not None:
            return ric.negative
        return self._congruence_counts(self.congruence())[1]

    def _built_blocks(self) -> _Blocks | None:
        """``K``'s merged blocks, built once for the two congruences (``None``: too large).

        Each congruence otherwise builds every block again; at most
        :data:`CONGRUENCE_BLOCKS_BYTES` are held, for one inertia.
        """
        ls = self.merged
        item = self.lu.last.l11u.element_size()
        sizes = ls.sizes
        total = sum(n * n for n in sizes)
        total += sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        if total * item > CONGRUENCE_BLOCKS_BYTES:
            return None
        return list(ls.diag), list(ls.upper)

    def _stage_witness(self) -> Inertia | None:
        """The trusted stage elimination's pivot signs, when something verifies them.

        The stage elimination's signs (:meth:`StageRiccati.signature`,
        eliminating ``v_{L-1}`` first, on ``H + dI``) must first agree with the
        sign and ``log|det|`` of the same pivots' LUs (:meth:`StageRiccati.lu_slogdet`,
        what the solves use). Then either the stage solve is a near inverse of
        ``H + dI`` (:meth:`near_inverse_bound` at most :data:`NEAR_INVERSE_LIMIT`:
        one solve and one product, :mod:`hessinv.solvers.near_inverse`), or the
        delayed-pivot congruence of ``K`` (first block first) agrees on every
        count and on the determinant (``det K' = (-1)^m det(Q^T (H + dI) Q) /
        s^{sum k_l}``). None when there is no trusted stage solver or neither
        verifies.
        """
        self._settle_trust()
        st = self.stage_solver
        if st is None or self._trust is not True:
            return None
        pos, neg, zero, la = st.signature()
        if zero or not math.isfinite(la) or not self._agrees_with_lu(st, neg, la):
            return None
        dp, dn, _ = self.system.dropped_inertia()
        counts = (pos + dp, neg + dn)
        bound = self.near_inverse_bound()
        if verifies(bound):
            how = (
                "the stage elimination of H + damping*I (Bunch-Kaufman pivot signs, last stage "
                f"first), whose solve G is a near inverse: ||I - (H + damping*I) G||_2 <= "
                f"{bound:.1e} < 1 ({PROBE_COLUMNS} random probes, chance of an understatement "
                f"<= {PROBE_FAILURE:g}), so no eigenvalue crosses zero between the two"
            )
            return Inertia(*counts, 0, verified=True, how=how)
        sign_k = -1.0 if (neg + self.m) % 2 else 1.0
        la_k = la - self.system.n_kept * math.log(self.system.scale)
        r = self._first_congruence((sign_k, la_k))
        if r is None or self._consistent_counts(r) != counts:
            return None
        how = (
            "two congruences agree: the stage elimination of H + damping*I (Bunch-Kaufman "
            "pivots, last stage first) and the delayed-pivot LDL^T of the lifted system "
            "(first block first), whose determinants also agree"
        )
        return Inertia(*counts, 0, verified=True, how=how)

    def _agrees_with_lu(self, st: StageRiccati, neg: int, la: float) -> bool:
        """The Bunch-Kaufman signs' parity and ``log|det|`` agree with the pivots' LUs."""
        s_lu, la_lu = st.lu_slogdet()
        return self._agrees_det(s_lu, la_lu, -1.0 if neg % 2 else 1.0, la)

    def near_inverse_bound(self) -> float:
        """``||I - (H + dI) G||_2`` on the kept directions, ``G`` the stage solve (an estimate).

        :func:`hessinv.solvers.near_inverse.near_inverse_bound` of
        :data:`PROBE_COLUMNS` standard normal probes projected on the kept
        directions (``H`` maps them into themselves; the dropped ones are exact):
        one stage solve and one product. ``inf`` without a stage solver.
        """
        if self.stage_solver is None:
            return math.inf
        y = self.system.project_kept(probes(self.size, self.dtype, self.op.device))
        return near_inverse_bound(self._stage_residual(y)[1])

    def _signs(self) -> Inertia:
        verified = (self._certified_riccati, self._stage_witness)
        if self.op.device.type not in RICCATI_FIRST_DEVICES:
            verified = verified[::-1]
        for route in verified:
            found = route()
            if found is not None:
                return found
        blocks = self._built_blocks() if self._congruence is None else None
        counts = self._congruence_counts(self.congruence(blocks))
        if self._congruence_reversed:  # the first-to-last attempts missed the LU's determinant
            if any(self._consistent_counts(r) == counts for r in self._unmatched):
                how = (
                    "two congruences of the lifted system agree on every count: delayed-pivot "
                    "LDL^T eliminating its blocks last to first, whose determinant agrees with "
                    "the pivoted LU's, and first to last, whose log|det| does not (K has many "
                    "eigenvalues near zero, each resolved to a few digits; the stage Riccati "
                    "pass had a pivot within its error bound of singular)"
                )
                return Inertia(*counts, 0, verified=True, how=how)
            how = (
                "signs of a delayed-pivot LDL^T congruence of the lifted system eliminating its "
                "blocks last to first, whose determinant agrees with the pivoted LU's; NOT "
                "verified (no first-to-last congruence matched the LU, and the stage Riccati "
                "pass had a pivot within its error bound of singular)"
            )
            return Inertia(*counts, 0, verified=False, how=how)
        rev = self.reversed_congruence(blocks)
        if rev is not None and self._consistent_counts(rev) == counts:
            how = (
                "two congruences of the lifted system agree: delayed-pivot LDL^T eliminating "
                "its blocks first to last and last to first (both determinants checked against "
                "the pivoted LU; the stage Riccati pass had a pivot within its error bound of "
                "singular)"
            )
            return Inertia(*counts, 0, verified=True, how=how)
        how = (
            "signs of a delayed-pivot LDL^T congruence of the lifted system, whose determinant "
            "agrees with the pivoted LU's; NOT verified (the stage Riccati pass had a pivot "
            "within its error bound of singular, and the reverse-order congruence "
            + ("disagreed)" if rev is not None else "did not match the LU)")
        )
        return Inertia(*counts, 0, verified=False, how=how)
