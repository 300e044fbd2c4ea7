"""Building derivatives outside ``torch.inference_mode``, whatever mode the caller is in.

Under ``torch.inference_mode()`` autograd records nothing, and
``torch.enable_grad()`` does not turn it back on: a tensor made
``requires_grad`` there produces outputs that do not require grad. The
reverse passes that form a stage's blocks (:mod:`hessinv.derivatives.autodiff`)
and the sample-mixing probes (:mod:`hessinv.mixing`) read such an output as
"does not depend on its input": a Hessian built inside an inference-mode
block came out as zero, silently. ``torch.func``'s transforms do not depend on
the mode, plain ``torch.autograd.grad`` does.

:func:`recording` runs a builder with inference mode switched off
(``torch.inference_mode(False)``, which torch allows inside an enabled block).
What it cannot undo is an *inference tensor* made earlier: autograd may not
save one for a backward pass. Parameters that are inference tensors are
refused by name (:func:`check_not_inference`); data is copied into a normal
tensor where it is read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

P = ParamSpec("P")
R = TypeVar("R")


def recording(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` outside ``torch.inference_mode`` (module doc); as is when not inside one."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper


def normal_tensor(t: Tensor) -> Tensor:
    """``t``, or a copy of it outside inference mode when ``t`` is an inference tensor."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def check_not_inference(named: Iterable[tuple[str, Tensor]]) -> None:
    """Raise ``ValueError`` naming the first parameter that is an inference tensor.

    Autograd cannot differentiate with respect to one, nor save one for a
    backward pass: the model was created (or its parameters replaced) inside
    ``torch.inference_mode()``.
    """
    for name, p in named:
        if isinstance(p, Tensor) and p.is_inference():
            raise ValueError(
                f"parameter {name!r} is an inference tensor (created inside "
                "torch.inference_mode()): autograd cannot differentiate with respect to "
                "it. Create the model outside inference mode, or replace its parameters "
                "with copies made outside it (p.clone() under torch.inference_mode(False))."
            )
