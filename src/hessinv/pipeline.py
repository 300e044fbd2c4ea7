"""Pipelines of stages ``z_l = f_l(z_{l-1}; x_l)`` (paper eq. 1).

A stage sees the whole batch, as a module does: ``z`` carries the ``N``
samples in its first dimension, and a stage must treat samples independently
(every layer but batch norm in training mode does). The last stage returns the
scalar loss, a sum or mean over samples. The flat parameter vector is each
stage's tensors in order, each flattened (row-major), which for a model built
by :func:`hessinv.Hessian` is ``model.parameters()`` order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

StageFn = Callable[[Tensor, tuple[Tensor, ...]], Tensor]


@dataclass
class Stage:
    """One stage of a pipeline, ``z_next = fn(z, params)``.

    Attributes:
        fn: The stage function. Takes the batched state ``z`` of shape
            ``(N, *a_in)`` and the tuple of parameter tensors, returns the next
            state ``(N, *a_out)``, or the scalar loss for the last stage.
        params: The stage's parameters ``x_l``, a tuple of tensors.
        structure: Optional description used for fast derivative paths (set
            by the ``nn.Sequential`` adapter; ``None`` means generic autodiff).
    """

    fn: StageFn
    params: tuple[Tensor, ...]
    structure: object | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"Stage.fn must be callable, got {type(self.fn).__name__}")
        if isinstance(self.params, Tensor):
            self.params = (self.params,)
        self.params = tuple(self.params)
        for i, p in enumerate(self.params):
            if not isinstance(p, Tensor):
                raise TypeError(f"Stage.params[{i}] must be a torch.Tensor, got {type(p).__name__}")

    @property
    def num_params(self) -> int:
        """Number of scalar parameters ``p_l`` of this stage."""
        return sum(p.numel() for p in self.params)

    def __call__(self, z: Tensor) -> Tensor:
        """Apply the stage to ``z`` with its own parameters."""
        return self.fn(z, self.params)


#: The dtypes hessinv computes in (half precision has too few digits for the lifted
#: factorization's pivoting and residual checks; complex parameters need a Hermitian theory).
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_dtype(dtype: torch.dtype, what: str) -> None:
    """Raise ``TypeError`` unless ``dtype`` is float32 or float64."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{what} has dtype {dtype}; hessinv supports float32 and float64 only "
            "(convert with .double() or .float())"
        )


def describe_stage(stage: Stage) -> str:
    """A short description of a stage for error messages: its module, or its function."""
    layer = getattr(stage.structure, "layer", None)
    if layer is not None:
        return repr(layer).replace("\n", " ")
    fn = stage.fn
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def run_stage(stage: Stage, z: Tensor, index: int) -> Tensor:
    """``stage(z)``, with an error inside the stage re-raised naming the stage and module.

    Raises:
        ValueError: Chained to the stage's own exception.
    """
    try:
        return stage(z)
    except Exception as e:
        raise ValueError(
            f"stage {index} ({describe_stage(stage)}) failed on input of shape "
            f"{tuple(z.shape)} ({z.dtype}): {type(e).__name__}: {e}"
        ) from e


def flatten_params(params: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector (row-major per tensor)."""
    if len(params) == 0:
        return torch.zeros(0)
    return torch.cat([p.reshape(-1) for p in params])


def unflatten_params(flat: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Split a flat vector into tensors shaped like ``like`` (inverse of flatten)."""
    out = []
    i = 0
    for p in like:
        n = p.numel()
        out.append(flat[i : i + n].reshape(p.shape))
        i += n
    return tuple(out)


#: Stage outputs of at most this many numbers in all are checked for NaN and Inf by one
#: reduction over their concatenation (a copy); larger ones by one sum per stage.
FINITE_CAT_MAX = 1 << 22


def _all_finite(outs: list[Tensor]) -> bool:
    """Whether every stage output is finite, read on the host once.

    Not one ``isfinite(z).all()`` per stage (about five kernel calls each:
    0.55 ms at depth 128): one concatenation when the outputs are small, else
    one sum per stage, which is NaN or infinite when an entry is (an
    overflowing sum of finite entries only sends the check to the exact one).
    """
    outs = [z for z in outs if z.dtype.is_floating_point or z.dtype.is_complex]
    if not outs:
        return True
    dev = outs[0].device
    if sum(z.numel() for z in outs) <= FINITE_CAT_MAX and all(z.device == dev for z in outs):
        return bool(torch.isfinite(torch.cat([z.reshape(-1) for z in outs])).all())
    sums = [z.sum().to(dev, torch.complex128 if z.dtype.is_complex else torch.float64)
            for z in outs]  # fmt: skip
    if bool(torch.isfinite(torch.stack(sums)).all()):
        return True
    return all(bool(torch.isfinite(z).all()) for z in outs)


def _first_non_finite(outs: list[Tensor], cause: Exception | None = None) -> None:
    """Raise naming the first stage whose output (``outs[i]``) had a NaN or an Inf, if any did."""
    if _all_finite(outs):
        return
    i = next(i for i, z in enumerate(outs) if not bool(torch.isfinite(z).all()))
    raise ValueError(f"stage {i} produced NaN or Inf") from cause


def memory_span(t: Tensor) -> tuple[int, int]:
    """The byte range ``[start, end)`` that ``t``'s elements occupy (for overlap tests)."""
    start = t.data_ptr()
    n = t.numel()
    if n == 0:
        return start, start
    if t.is_contiguous():  # (the usual parameter: its elements, back to back)
        return start, start + n * t.element_size()
    extent = 1 + sum((size - 1) * abs(st) for size, st in zip(t.shape, t.stride(), strict=True))
    return start, start + extent * t.element_size()


def first_overlap(named: Sequence[tuple[str, Tensor]]) -> tuple[str, str] | None:
    """The names of two tensors whose memory overlaps (tied parameters), else ``None``.

    Disjoint views of one buffer (a flat parameter store) do not count.
    """
    spans = sorted(
        (memory_span(t) + (name,) for name, t in named if t.numel()), key=lambda s: s[:2]
    )
    for (_, end0, name0), (start1, _, name1) in zip(spans, spans[1:], strict=False):
        if start1 < end0:
            return name0, name1
    return None


def _check_no_shared_tensors(stages: Sequence[Stage]) -> None:
    """Refuse a parameter tensor (or memory) used in two places: ``H`` would be of the untied.

    Raises:
        ValueError: Naming both places.
    """
    named = [
        (f"stages[{i}].params[{j}]", p)
        for i, s in enumerate(stages)
        for j, p in enumerate(s.params)
    ]
    pair = first_overlap(named)
    if pair is not None:
        raise ValueError(
            f"{pair[1]} shares memory with {pair[0]} (a tied parameter): hessinv treats "
            "every tensor as its own parameter, so H would be that of the untied "
            "pipeline. Pass the tensor once, to one stage, and reuse it inside that stage"
        )


class Pipeline:
    """A validated list of stages and the pipeline's input ``z0``.

    Args:
        stages: The stages ``f_1..f_L``; the last returns a scalar.
        z0: The input, batch in the first dimension.

    Raises:
        ValueError: Empty pipeline, non-finite input or parameters, mixed
            devices, or a last stage that does not return a scalar.
        TypeError: Mixed or non-floating dtypes.
    """

    def __init__(self, stages: Sequence[Stage], z0: Tensor) -> None:
        stages = list(stages)
        if len(stages) == 0:
            raise ValueError("a pipeline needs at least one stage")
        for i, s in enumerate(stages):
            if not isinstance(s, Stage):
                raise TypeError(f"stages[{i}] must be a hessinv.Stage, got {type(s).__name__}")
        if not isinstance(z0, Tensor):
            raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
        if z0.dim() < 1 or z0.shape[0] < 1:
            raise ValueError(
                f"z0 must carry a non-empty batch in its first dimension, got {tuple(z0.shape)}"
            )
        params = [p for s in stages for p in s.params]
        if not params:
            raise ValueError("the pipeline has no parameters")
        dtype, device = params[0].dtype, params[0].device
        for i, s in enumerate(stages):
            for j, p in enumerate(s.params):
                if p.dtype not in SUPPORTED_DTYPES:  # (the message names the stage's module)
                    check_dtype(p.dtype, f"parameter {j} of stage {i} ({describe_stage(s)})")
        if z0.dtype.is_floating_point or z0.dtype.is_complex:
            check_dtype(z0.dtype, "the input")
        for p in params:
            if p.dtype != dtype:
                raise TypeError(f"all parameters must share one dtype: found {dtype} and {p.dtype}")
            if p.device != device:
                raise ValueError(
                    f"all parameters must be on one device: found {device} and {p.device}"
                )
        # one pass over all parameters (a call per tensor costs more at depth 128)
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        if not bool(torch.isfinite(flat).all()):
            i, j = next(
                (i, j)
                for i, st in enumerate(stages)
                for j, p in enumerate(st.params)
                if not bool(torch.isfinite(p).all())
            )
            raise ValueError(
                f"parameter {j} of stage {i} ({describe_stage(stages[i])}) contains NaN or Inf"
            )
        _check_no_shared_tensors(stages)
        if z0.device != device:
            raise ValueError(f"z0 is on {z0.device} but the parameters are on {device}")
        if z0.dtype.is_floating_point and z0.dtype != dtype:
            raise TypeError(f"z0 has dtype {z0.dtype} but the parameters have {dtype}")
        if z0.dtype.is_floating_point and not torch.isfinite(z0).all():
            raise ValueError("z0 contains NaN or Inf")
        self.stages = stages
        self.z0 = z0
        self.dtype = dtype
        self.device = device
        self.batch_size = z0.shape[0]
        self.param_shapes = [tuple(p.shape) for p in params]
        self._zs: list[Tensor] | None = None  # the forward pass, once computed
        self.stage_sizes = [s.num_params for s in stages]
        self.num_params = sum(self.stage_sizes)

    @property
    def params(self) -> list[Tensor]:
        """All parameter tensors, in flat order."""
        return [p for s in self.stages for p in s.params]

    def forward(self) -> list[Tensor]:
        """Run the pipeline; return ``[z_0, z_1, ..., z_L]`` (``z_L`` the loss).

        Computed once and kept: the memory estimate, the mixing probes and the
        blocks all start from it while an operator is built, and an operator
        refuses any use once its parameters change
        (:class:`hessinv.staleness.ParameterSnapshot`), so the kept pass is
        never read for other parameters.
        """
        if self._zs is None:
            self._zs = self._run()
        return list(self._zs)

    def _run(self) -> list[Tensor]:
        zs = [self.z0]
        try:
            with torch.no_grad():
                self._stages_forward(zs)
        except Exception as e:  # a stage may fail on an earlier stage's NaN: name that first
            _first_non_finite(zs[1:], e)
            raise
        _first_non_finite(zs[1:])  # read on the host once (not a sync per stage)
        return zs

    def _stages_forward(self, zs: list[Tensor]) -> None:
        """Append each stage's output to ``zs``."""
        for i, s in enumerate(self.stages):
            z = run_stage(s, zs[-1], i)
            if not isinstance(z, Tensor):
                raise TypeError(f"stage {i} returned {type(z).__name__}, not a tensor")
            last = i == len(self.stages) - 1
            if last and z.numel() != 1:
                raise ValueError(
                    f"the last stage must return the scalar loss, got shape {tuple(z.shape)}"
                )
            if not last and (z.dim() < 1 or z.shape[0] != self.batch_size):
                raise ValueError(
                    f"stage {i} returned shape {tuple(z.shape)}; a non-final stage must "
                    "keep the "
                    f"batch of {self.batch_size} in its first dimension"
                )
            zs.append(z.reshape(()) if last else z)

    def loss_of_flat(self, flat: Tensor) -> Tensor:
        """The loss as a function of the flat parameter vector (for references)."""
        z = self.z0
        i = 0
        for s in self.stages:
            n = s.num_params
            z = s.fn(z, unflatten_params(flat[i : i + n], s.params))
            i += n
        return z.reshape(())
