"""One place for the methods' costs: flop and memory estimates, and ``method="auto"``.

Estimates are made from shapes alone, before anything large is allocated, so
that a problem too large for memory is refused at once with the estimate
(:func:`check_memory`), not after minutes of work.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..hessian import Hessian

GIB = 2.0**30

#: Methods that factor ``H + dI`` exactly (``auto`` chooses among them).
EXACT_METHODS = ("lifted", "dense")


def available_memory(device: torch.device) -> float:
    """Bytes a computation may use on ``device``: free CUDA memory, or available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:  # pragma: no cover - not Linux
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return float("inf")


def memory_budget(device: torch.device, max_memory: float | None) -> float:
    """Bytes a computation may use: ``max_memory``, else what ``device`` has available."""
    return available_memory(device) if max_memory is None else float(max_memory)


def check_memory(need: float, what: str, max_memory: float | None, device: torch.device) -> None:
    """Raise ``MemoryError`` naming GiB if ``need`` bytes exceed the budget.

    Args:
        need: Estimated bytes.
        what: What needs them (for the message).
        max_memory: The budget in bytes (``None``: what ``device`` has available).
        device: Where the memory would be allocated.
    """
    budget = memory_budget(device, max_memory)
    if need > budget:
        raise MemoryError(
            f"{what} needs about {need / GIB:.3g} GiB, more than the "
            f"{budget / GIB:.3g} GiB available"
            + (" (max_memory)" if max_memory is not None else f" on {device}")
            + ". Use a smaller batch (e.g. curvature on a sub-batch), a narrower network, "
            "or raise max_memory if the estimate is too cautious."
        )


#: Nominal sustained rates (flop/s) for the time estimate, deliberately round: one or
#: two CPU cores on the lifted system's many small blocks, on one large dense
#: eigendecomposition, and a data-centre GPU.
NOMINAL_RATE = {"cpu": 1e10, "cpu-dense": 5e10, "cuda": 1e12}
#: Estimated seconds above which :func:`warn_if_slow` warns.
SLOW_SECONDS = 30.0
_CHEAPER = {
    "lifted": "the lifted blocks grow with batch x width and with the parameters per layer: a "
    "smaller batch (curvature on a sub-batch) or narrower layers are cheaper, and for "
    "Gauss-Newton method='kernel'",
    "dense": "the dense route costs O(W^3): method='lifted' is linear in depth",
}


def warn_if_slow(flops: float, method: str, device: torch.device) -> None:
    """Warn (:class:`hessinv.errors.CostWarning`) before work estimated above ``SLOW_SECONDS``.

    The estimate is ``flops`` at :data:`NOMINAL_RATE`; the message says what is cheaper.
    """
    key = f"{device.type}-{method}" if f"{device.type}-{method}" in NOMINAL_RATE else device.type
    rate = NOMINAL_RATE.get(key, 1e10)
    seconds = flops / rate
    if seconds > SLOW_SECONDS:
        from ..errors import CostWarning

        warnings.warn(
            f"the {method!r} factorization is estimated at {flops:.2g} flops, about "
            f"{seconds:.0f} s on {device.type} (at a nominal {rate:.0e} flop/s); "
            + _CHEAPER.get(method, "a smaller batch or network is cheaper"),
            CostWarning,
            stacklevel=4,
        )


def block_memory(pipeline, zs: list[torch.Tensor]) -> float:  # noqa: ANN001
    """Bytes of the per-stage derivative blocks, from the shapes of a forward pass.

    Per stage: ``Jx`` (``N a_l p_l``), ``Jz`` (``N a_l a_{l-1}``), ``Tzz``
    (``N a_{l-1}^2``), ``Tzx`` (``N a_{l-1} p_l``) and ``Txx`` (``p_l^2``, which
    layers linear in their parameters do not store), times two for the
    transient work of computing them.
    """
    n = pipeline.batch_size
    item = torch.finfo(pipeline.dtype).bits // 8
    total = 0.0
    last = len(pipeline.stages) - 1
    for l, st in enumerate(pipeline.stages):  # noqa: E741
        p = st.num_params
        a_in = zs[l][0].numel() if zs[l].dim() else 1
        a_out = 0 if l == last else zs[l + 1][0].numel()
        numbers = n * a_out * (p + a_in) + n * a_in * (a_in + p)
        structured = getattr(st.structure, "layer", None) is not None and isinstance(
            st.structure.layer, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
        )
        if not structured:
            numbers += p * p
        total += numbers
    return 2.0 * total * item


def lifted_sizes(op: Hessian) -> list[int]:
    """Block sizes of the lifted system: ``k_l + N a_l`` and ``N a_l`` alternating, ``k_L``."""
    sizes = []
    for b in op.blocks:
        k = b.num_params
        if b.has("x_span"):  # the lifted system keeps at most this many directions
            rows = b.rows("x_span") + b.rows("Tzx")
            k = min(k, rows)
        m = b.rows("Jx")
        sizes += [k + m, m] if m else [k]
    return sizes


def lifted_cost(op: Hessian) -> tuple[float, float]:
    """``(flops, bytes)`` of the lifted factorization.

    Flops: the pivoted panel factorizations, ``sum_i 2 (n_i + n_{i+1}) n_i^2``,
    plus ``1e5`` per block for Python and kernel-launch overhead. Bytes: the
    stored factors, ``(n_i + n_{i+1}) n_i + n_i (n_{i+1} + n_{i+2})`` numbers
    per block, plus two blocks' worth of work space.
    """
    return lifted_cost_of_sizes(lifted_sizes(op), torch.finfo(op.dtype).bits // 8)


def lifted_cost_of_sizes(sizes: list[int], itemsize: int) -> tuple[float, float]:
    """``(flops, bytes)`` of the pivoted block LU of blocks of these sizes (:func:`lifted_cost`)."""
    flops = stored = 0.0
    for i, n in enumerate(sizes):
        n1 = sizes[i + 1] if i + 1 < len(sizes) else 0
        n2 = sizes[i + 2] if i + 2 < len(sizes) else 0
        flops += 2.0 * (n + n1) * n * n + 1e5
        stored += (n + n1) * n + n * (n1 + n2)
    big = max(sizes) if sizes else 0
    return flops, (stored + 6.0 * big * big) * itemsize


def dense_cost(op: Hessian) -> tuple[float, float]:
    """``(flops, bytes)`` of the dense route.

    Forming ``H`` by ``W`` products (``W sum_l 4 N (a_l a_{l-1} + 2 a_l p_l)``)
    and its eigendecomposition (about ``9 W^3``); memory: ``H``, its
    eigenvectors and ``eigh``'s work space (``3 W^2``), plus the tangents of the
    ``W`` simultaneous products (``W sum_l N a_l``).
    """
    w = float(op.num_params)
    per_hv = 0.0
    tangents = 0.0
    for b in op.blocks[:-1]:
        n, a, p = b.shape_of("Jx")  # type: ignore[misc]
        per_hv += 4.0 * n * (a * a + 2 * a * p)
        tangents += 2.0 * n * a
    item = torch.finfo(op.dtype).bits // 8
    return w * per_hv + 9.0 * w**3, (3.0 * w * w + w * tangents) * item


def costs(op: Hessian) -> dict[str, tuple[float, float]]:
    """``method -> (flops, bytes)`` of the Hessian's exact methods (``Solves.costs``).

    Operators with more methods extend their own ``costs()`` (GaussNewton adds
    its kernel form, :meth:`hessinv.GaussNewton.costs`).
    """
    return {"lifted": lifted_cost(op), "dense": dense_cost(op)}


def choose(
    op: Hessian,
    max_memory: float | None = None,
    costs: dict[str, tuple[float, float]] | None = None,
) -> str:
    """The cheapest exact method whose memory fits (``method="auto"``).

    The candidates and their ``(flops, bytes)`` are the operator's own
    ``op.costs()`` (:func:`costs` for a Hessian; GaussNewton adds its kernel),
    or ``costs`` when the caller already has them.

    Raises:
        MemoryError: No method fits; the message names the smallest estimate.
    """
    cs = op.costs() if costs is None else costs
    budget = memory_budget(op.device, max_memory)
    fits = {k: v for k, v in cs.items() if v[1] <= budget}
    if not fits:
        name, (_, need) = min(cs.items(), key=lambda kv: kv[1][1])
        check_memory(need, f"the cheapest factorization ({name!r})", max_memory, op.device)
    return min(fits, key=lambda k: fits[k][0])
