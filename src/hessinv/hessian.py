"""The user-facing linear operator: the exact Hessian of a layered network.

>>> import torch, hessinv
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> nn = torch.nn
>>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
>>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
>>> H = hessinv.Hessian(model, torch.nn.MSELoss(), X, y)
>>> H.shape
(21, 21)
>>> g = H.gradient()
>>> x = H.solve(g, damping=1e-3)
>>> bool(torch.allclose(H @ x + 1e-3 * x, g))
True
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .derivatives import StageBlocks
from .errors import check_finite
from .gc_pause import paused_gc
from .grad_mode import check_not_inference, normal_tensor, recording
from .mixing import check_no_mixing
from .module_params import model_parameters, walk_memo
from .operator import LinearOperator
from .pipeline import Pipeline, Stage
from .products import StageRun, compute_blocks, gradient, hvp, stage_runs
from .progress import ProgressArg, check_progress
from .solvers import Factorization
from .solvers import select as _select
from .solves import Solves
from .staleness import ParameterSnapshot
from .trace import ParamsArg, stages_for_model
from .validate import check_damping
from .vectors import Layout


class Hessian(Solves, LinearOperator):
    """The exact Hessian of a layered network, as a linear operator.

    ``Hessian(model, loss_func, X, y)`` for an ``nn.Sequential`` (nested ones
    flattened) or any module ``torch.fx`` traces (:mod:`hessinv.trace`) and a
    loss with reduction ``"sum"`` or ``"mean"``; or :meth:`from_stages` for a
    functional pipeline. Parameters with ``requires_grad=False``, or left out
    of ``params``, are constants, left out of ``H``.

    The per-stage derivative blocks are computed once, at construction; ``H @ v``
    then costs one forward and one backward sweep (eq. 24), and
    :meth:`solve` factors the lifted block-tridiagonal system exactly.
    A :class:`hessinv.LinearOperator`: ``H @ V``, ``V @ H``, ``H + d * H.identity()``,
    ``0.5 * H``, ``H.T``, ``to_scipy(dtype=)`` (:mod:`hessinv.operator`).

    ``Hessian(model, loss_func, data=batches)`` is the Hessian of the loss of
    a whole data set given as batches (a list of ``(X, y)`` or a
    ``DataLoader``; :mod:`hessinv.data`): the mean over all samples for
    ``reduction="mean"``, the sum for ``"sum"``. Products, the gradient and
    the diagonal go batch by batch in the memory of one batch (each call
    recomputes each batch's blocks); a factorization (``solve``, ``logdet``,
    ``inertia``, ``inverse_diagonal``, ``eigsh``, ...) stacks all batches into
    one lifted system of ``N`` (all samples) rows per stage, so it costs what
    ``Hessian(model, loss_func, X_all, y_all)`` costs (its memory check and
    :class:`~hessinv.errors.CostWarning` count all ``N`` samples).

    Args:
        model: The network.
        loss_func: ``loss_func(model(X), y)`` is the scalar loss.
        X: Inputs, batch first (or ``data=``).
        y: Targets, batch first (or ``data=``).
        data: Instead of ``X, y``: a re-iterable of ``(X, y)`` batches (a list,
            a tuple or a ``DataLoader``; a one-shot iterator or generator is
            refused: pass ``list(...)``). ``loss_func`` must carry its
            ``reduction`` (``"mean"`` or ``"sum"``).
        params: The variables, an iterable of the model's parameters or a dict
            name -> parameter, in flat-vector order (default: those with
            ``requires_grad``, ``model.parameters()`` order).
        generic: Use generic autodiff for every block (no fast paths).
        max_memory: Bytes this operator may allocate for its blocks and
            factorizations (default: the memory available on the device);
            larger needs are refused with a ``MemoryError`` naming GiB
            before anything is allocated.
        progress: A ``tqdm`` bar on stderr for builds and factorizations that
            run longer than 2 s (``True``), never (``False``), or after this
            many seconds (:mod:`hessinv.progress`).
    """

    symmetric = True

    def __new__(cls, *args: object, data: object = None, **kwargs: object) -> Hessian:  # noqa: D102
        if data is not None:
            from .data import data_operator_class

            return super().__new__(data_operator_class(cls))
        return super().__new__(cls)

    @recording
    @paused_gc
    def __init__(
        self,
        model: nn.Module,
        loss_func: Callable[..., Tensor],
        X: Tensor | None = None,  # noqa: N803
        y: Tensor | None = None,
        *,
        data: object = None,
        params: ParamsArg = None,
        generic: bool = False,
        max_memory: float | None = None,
        progress: ProgressArg = True,
    ) -> None:
        if data is not None:  # only reached by calling __init__ directly
            raise TypeError("data= builds a data-set operator: call Hessian(..., data=...)")
        if X is None or y is None:
            raise TypeError(f"{type(self).__name__} needs X and y, or data=[(X, y), ...]")
        if not isinstance(X, Tensor) or not isinstance(y, Tensor):
            raise TypeError("X and y must be tensors")
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"X has {X.shape[0]} samples but y has {y.shape[0]}")
        if y.dtype.is_floating_point and not torch.isfinite(y).all():
            raise ValueError("y contains NaN or Inf")
        with walk_memo():  # the model checks walk its parameters once
            stages, z0 = stages_for_model(
                model, loss_func, normal_tensor(X), normal_tensor(y), params
            )
            check_not_inference(model_parameters(model))  # (after the lazy-module refusals)
        self._init(
            Pipeline(stages, z0),
            generic=generic,
            check_mixing=True,
            max_memory=max_memory,
            progress=progress,
        )
        self._snapshot.watch(model)
        self._snapshot.watch_loss(loss_func)
        self._snapshot.watch_data(X=X, y=y)

    @classmethod
    def from_stages(
        cls,
        stages: Sequence[Stage],
        z0: Tensor,
        *,
        generic: bool = False,
        check_mixing: bool = True,
        max_memory: float | None = None,
        progress: ProgressArg = True,
    ) -> Hessian:
        """Build the operator of a functional pipeline.

        Args:
            stages: ``hessinv.Stage(fn, params)`` objects; the last returns the
                scalar loss (a sum or mean over samples).
            z0: The input, batch first.
            generic: Unused for functional stages (always generic autodiff).
            check_mixing: Verify with random probes (:func:`hessinv.mixing.check_no_mixing`)
                that no stage mixes samples (raises ``ValueError``).
            max_memory: As for the constructor.
            progress: As for the constructor.
        """
        self = cls.__new__(cls)
        self._init(
            Pipeline(stages, normal_tensor(z0)),
            generic=generic,
            check_mixing=check_mixing,
            max_memory=max_memory,
            progress=progress,
        )
        self._snapshot.watch_data(z0=z0)
        return self

    def _compute_blocks(
        self, pipeline: Pipeline, generic: bool
    ) -> tuple[Tensor, list[StageBlocks]]:
        """The loss and the stage blocks this operator is made of (``H``'s own).

        The blocks are stacked per run of equal stages at once, while nothing
        else holds them (:func:`hessinv.products.stage_runs`).
        """
        loss, blocks = compute_blocks(pipeline, generic=generic, progress=self.progress)
        self._runs = stage_runs(blocks)
        return loss, blocks

    def _check_block_memory(self, pipeline: Pipeline) -> None:
        """Refuse before computing stage blocks that would not fit (``MemoryError``).

        A hook: ``GaussNewton`` builds its stage blocks lazily and checks then.
        """
        _select.check_memory(
            _select.block_memory(pipeline, pipeline.forward()),
            "computing the per-stage derivative blocks",
            self.max_memory,
            pipeline.device,
        )

    @recording
    @paused_gc
    def _init(
        self,
        pipeline: Pipeline,
        *,
        generic: bool,
        check_mixing: bool,
        max_memory: float | None = None,
        progress: ProgressArg = True,
    ) -> None:
        self.progress = check_progress(progress)
        check_not_inference(
            (f"{j} of stage {i}", p)
            for i, st in enumerate(pipeline.stages)
            for j, p in enumerate(st.params)
        )
        self.pipeline = pipeline
        self.layout = Layout(tuple(pipeline.param_shapes), pipeline.dtype, pipeline.device)
        self.max_memory = max_memory
        if check_mixing:
            check_no_mixing(pipeline)
        self._snapshot = ParameterSnapshot.of_pipeline(pipeline)
        self._check_block_memory(pipeline)
        self._runs: list[StageRun] | None = None  # set by _compute_blocks (Hessian's own)
        self._loss, self.blocks = self._compute_blocks(pipeline, generic)
        self._factors: OrderedDict[tuple[float, str], Factorization] = OrderedDict()
        self._dense_eigh: tuple[Tensor, Tensor] | None = None
        self._bounds: tuple[float, float] | None = None

    # -- operator basics ---------------------------------------------------
    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(W={self.num_params}, stages={len(self.pipeline.stages)}, "
            f"batch={self.pipeline.batch_size}, dtype={self.dtype}, device={self.device})"
        )

    @property
    def num_params(self) -> int:
        """``W``, the number of parameters (``shape``, ``dtype``, ``device``: the layout's)."""
        return self.layout.size

    @property
    def stage_blocks(self) -> list[StageBlocks]:
        """The per-stage derivative blocks (the paper's section 5; :mod:`hessinv.derivatives`)."""
        self._check_fresh()
        return self.blocks

    #: The threads inside :meth:`_fresh_call` (the parameters were checked at its start).
    _fresh_threads: frozenset[int] | set[int] = frozenset()

    def _check_fresh(self) -> None:
        """Raise :class:`hessinv.StaleOperatorError` if the parameters changed since build.

        Skipped in a thread inside :meth:`_fresh_call`, which checked once at its start.
        """
        if threading.get_ident() not in self._fresh_threads:
            self._snapshot.check()

    @contextlib.contextmanager
    def _fresh_call(self) -> Iterator[None]:
        """Check the parameters once for a whole public call (a solve and its products).

        A default solve makes about ten products and norm estimates, each of
        which checked every parameter's bytes (``O(W)`` and a Python loop over
        the tensors, ~0.4 ms at 128 tensors); no user code runs in between in
        the calling thread, so one check at the start of the call decides for
        all of them. Per thread: a call in another thread sharing the operator
        checks for itself (a parameter changed there meanwhile is caught).
        """
        me = threading.get_ident()
        if me in self._fresh_threads:
            yield
            return
        self._snapshot.check()
        held = self.__dict__.setdefault("_fresh_threads", set())  # (the class's is frozen)
        held.add(me)  # setdefault, set.add and discard are atomic under the GIL
        try:
            yield
        finally:
            held.discard(me)

    def loss(self) -> Tensor:
        """The loss ``z_L`` at the current parameters."""
        self._check_fresh()
        return self._loss

    def gradient(self) -> Tensor:
        """The flat gradient, ``e_L M^{-1} D_x`` (paper eq. 8)."""
        self._check_fresh()
        return check_finite(gradient(self.blocks), "the gradient", self.dtype)

    def matmat(self, v: Tensor) -> Tensor:
        """``H V`` for ``V`` of shape ``(W, k)`` (no checks of ``V``)."""
        self._check_fresh()
        return hvp(self.blocks, v, self._runs)  # runs stacked with the blocks

    def _matmat_checked(self, v: Tensor) -> Tensor:
        """``H V`` for ``@``: :class:`~hessinv.errors.NonFiniteError` on overflow."""
        return check_finite(self.matmat(v), "H @ v", self.dtype)

    def diagonal(self) -> Tensor:
        """The exact diagonal of ``H`` (length ``W``), linear in depth (:mod:`hessinv.diagonal`)."""
        from .diagonal import diagonal

        self._check_fresh()
        return check_finite(diagonal(self.blocks), "the diagonal of H", self.dtype)

    def block_diagonal(self) -> list[Tensor]:
        """The exact ``p_l x p_l`` diagonal blocks of ``H``, one per stage, linear in depth."""
        from .diagonal import block_diagonal

        self._check_fresh()
        what = "a diagonal block of H"
        return [check_finite(b, what, self.dtype) for b in block_diagonal(self.blocks)]

    def to_dense(self) -> Tensor:
        """The ``W x W`` matrix, ``H @ I``."""
        self._check_fresh()
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        h = self.matmat(eye)
        return 0.5 * (h + h.T)

    def to_scipy(self, dtype=None):  # noqa: ANN001, ANN201
        """A ``scipy.sparse.linalg.LinearOperator`` for ``H`` (symmetric).

        Args:
            dtype: The NumPy dtype it reports and returns (default: the
                operator's); inputs are converted to the operator's dtype for
                the products.
        """
        return super().to_scipy(dtype)

    # -- spectrum and selected inversion: thin wrappers (hessinv.selinv, hessinv.spectrum) --
    def inverse_diagonal(self, damping: float = 0.0) -> Tensor:
        """The diagonal of ``(H + damping I)^{-1}`` (length ``W``), by selected inversion."""
        from .selinv import inverse_diagonal

        self._check_fresh()
        return inverse_diagonal(self.blocks, check_damping(damping))

    def inverse_block_diagonal(self, damping: float = 0.0) -> list[Tensor]:
        """The ``p_l x p_l`` diagonal blocks of ``(H + damping I)^{-1}``, one per stage."""
        from .selinv import inverse_block_diagonal

        self._check_fresh()
        return inverse_block_diagonal(self.blocks, check_damping(damping))

    def eigsh(self, k: int = 6, sigma: float | None = None, which: str = "LM", **kwargs):  # noqa: ANN003, ANN201
        """``k`` eigenpairs, as ``scipy.sparse.linalg.eigsh`` (:func:`hessinv.spectrum.eigsh`)."""
        from .spectrum import eigsh

        return eigsh(self, k, sigma, which, **kwargs)

    def eigenvalue_count(self, sigma: float) -> int:
        """The number of eigenvalues below ``sigma``, exactly (inertia of ``H - sigma I``)."""
        from .spectrum import eigenvalue_count

        return eigenvalue_count(self, sigma)

    def spectral_histogram(self, edges):  # noqa: ANN001, ANN201
        """Exact eigenvalue counts in ``[edges[i], edges[i+1])`` (:mod:`hessinv.spectrum`)."""
        from .spectrum import spectral_histogram

        return spectral_histogram(self, edges)
