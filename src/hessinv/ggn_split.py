"""Where the network ends and the loss begins: the output split of a pipeline.

The generalized Gauss-Newton matrix ``G = sum_n J_n^T Lambda_n J_n`` needs the
network output ``y`` (``J_n = d y_n / d theta``) and the loss as a function of
it (``Lambda_n = d2 l / dy_n dy_n``). A pipeline's last stage computes both at
once, ``z_L = l(f_L(z_{L-1}; x_L))``; :func:`output_split` takes it apart, for
each way a pipeline is built:

* an ``nn.Sequential`` (:mod:`hessinv.layers`): the last stage's layer and its
  parameter-free tail are the network, ``loss_func(., y)`` the loss;
* a traced module (:mod:`hessinv.trace`, :class:`hessinv.fxgraph.SegmentFn`):
  the graph's output node is the network output;
* a functional pipeline (:meth:`hessinv.GaussNewton.from_stages`): the user's
  stages compute the network output and :class:`NetworkThenLoss` appends the
  loss given separately.

**LogSoftmax + NLLLoss.** NLL is linear in the log-probabilities, so the
literal Gauss-Newton matrix of a model ending in ``LogSoftmax`` with
``nn.NLLLoss`` is zero. For a model (Sequential or traced) whose output is a
``log_softmax`` (module, function or method) and whose loss is an
``nn.NLLLoss``, ``y`` is the *input* of the ``log_softmax`` and the loss
``NLL(log_softmax(y))``: cross-entropy on the logits, what users of
``CrossEntropyLoss`` get. A functional pipeline states its split itself and
is taken literally.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .fxgraph import SegmentFn
from .layers import StageStructure
from .pipeline import Pipeline, Stage

NetFn = Callable[[Tensor, tuple[Tensor, ...]], Tensor]


@dataclass
class OutputSplit:
    """Where the network ends and the loss begins.

    Attributes:
        net_last: ``net_last(z, params)``: the last stage without the loss
            (and without a final ``log_softmax`` folded into the loss).
        loss: ``loss(y)``: the scalar loss of the network output ``y``.
        folded: True if a final ``log_softmax`` + ``NLLLoss`` was read as
            cross-entropy on the logits.
    """

    net_last: NetFn
    loss: Callable[[Tensor], Tensor]
    folded: bool


class NetworkThenLoss:
    """The last stage of a functional Gauss-Newton pipeline: ``loss_func(net(z, params), y)``.

    Args:
        net: The user's last stage function, returning the network output
            (batch first).
        loss_func: ``loss_func(output, y)`` (or ``loss_func(output)`` when
            ``y`` is ``None``), the scalar loss: a sum or mean of per-sample terms.
        y: The targets, or ``None``.
    """

    def __init__(self, net: NetFn, loss_func: Callable[..., Tensor], y: Tensor | None) -> None:
        self.net = net
        self.loss_func = loss_func
        self.y = y
        self.__qualname__ = f"{getattr(net, '__qualname__', type(net).__name__)} + loss"

    def loss(self, out: Tensor) -> Tensor:
        """The scalar loss of the network output ``out``."""
        val = self.loss_func(out) if self.y is None else self.loss_func(out, self.y)
        return val.reshape(())

    def __call__(self, z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        """The loss of the network output for input ``z`` and parameters ``params``."""
        return self.loss(self.net(z, params))


def network_then_loss(
    stages: Sequence[Stage], loss_func: Callable[..., Tensor] | None, y: Tensor | None
) -> list[Stage]:
    """``stages`` with ``loss_func(., y)`` appended to the last (:class:`NetworkThenLoss`).

    Raises:
        TypeError: No callable ``loss_func``, ``y`` not a tensor, a last stage
            that is not a ``hessinv.Stage``.
        ValueError: No stage.
    """
    if loss_func is None or not callable(loss_func):
        raise TypeError(
            "GaussNewton.from_stages needs loss_func=: the stages compute the network "
            "output, loss_func(output, y) the scalar loss (GaussNewton is J^T Lambda J "
            "with J the Jacobian of that output)"
        )
    if y is not None and not isinstance(y, Tensor):
        raise TypeError(f"y must be a tensor or None, got {type(y).__name__}")
    stages = list(stages)
    if not stages:
        raise ValueError("a pipeline needs at least one stage")
    last = stages[-1]
    if not isinstance(last, Stage):
        raise TypeError(f"stages[-1] must be a hessinv.Stage, got {type(last).__name__}")
    if isinstance(loss_func, nn.NLLLoss):
        warnings.warn(
            "GaussNewton.from_stages with nn.NLLLoss: the loss is linear in the last stage's "
            "output, so G = 0; for the Gauss-Newton matrix of a classifier, let the last "
            "stage return the logits and use nn.CrossEntropyLoss",
            stacklevel=3,
        )
    stages[-1] = Stage(NetworkThenLoss(last.fn, loss_func, y), last.params)
    return stages


def output_split(pipeline: Pipeline) -> OutputSplit:
    """The network/loss split of a pipeline's last stage (module doc).

    Raises:
        ValueError: The last stage comes from :meth:`hessinv.Hessian.from_stages`
            (a loss with no separate network output).
    """
    last = pipeline.stages[-1]
    st = last.structure
    if isinstance(st, StageStructure) and st.loss is not None:
        return _sequential_split(st)
    fn = last.fn
    if isinstance(fn, SegmentFn) and fn.loss is not None:
        return _traced_split(fn)
    if isinstance(fn, NetworkThenLoss):
        return OutputSplit(fn.net, fn.loss, folded=False)
    raise ValueError(
        "GaussNewton needs to know where the network ends and the loss begins: use "
        "GaussNewton(model, loss_func, X, y), or GaussNewton.from_stages(stages, z0, "
        "loss_func=..., y=...) with stages that return the network output"
    )


def _is_nll(loss_func: object) -> bool:
    return isinstance(loss_func, nn.NLLLoss)


def _sequential_split(st: StageStructure) -> OutputSplit:
    """The split of an ``nn.Sequential``'s last stage (layer, tail modules, loss)."""
    loss_func, target = st.loss
    tail = list(st.tail)
    folded = _is_nll(loss_func) and len(tail) > 0 and isinstance(tail[-1], nn.LogSoftmax)
    head = tail[:-1] if folded else tail
    log_softmax = tail[-1] if folded else None

    def net_last(z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        y = st.layer_fn(z, params)
        for m in head:
            y = m(y)
        return y

    def loss(y: Tensor) -> Tensor:
        if log_softmax is not None:
            y = log_softmax(y)
        return loss_func(y, target).reshape(())

    return OutputSplit(net_last, loss, folded)


_LOG_SOFTMAX_FUNCTIONS = (F.log_softmax, torch.log_softmax)


def _log_softmax_input(fn: SegmentFn) -> fx.Node | None:
    """The input node of the segment's output node if that node is a ``log_softmax``.

    Only when every other argument is a constant (the ``dim``), so that the
    ``log_softmax`` can be applied to any ``y`` on its own.
    """
    end = fn.end
    if end is fn.start:
        return None
    if end.op == "call_module":
        is_ls = isinstance(fn.model.get_submodule(end.target), nn.LogSoftmax)
    elif end.op == "call_function":
        is_ls = end.target in _LOG_SOFTMAX_FUNCTIONS
    elif end.op == "call_method":
        is_ls = end.target == "log_softmax"
    else:
        is_ls = False
    if not is_ls or not end.args or not isinstance(end.args[0], fx.Node):
        return None
    others = [a for a in end.all_input_nodes if a is not end.args[0]]
    if any(a not in fn.baked for a in others):
        return None
    return end.args[0]


def _traced_split(fn: SegmentFn) -> OutputSplit:
    """The split of a traced last stage: the graph's output node, or its log-softmax's input."""
    loss_func, target = fn.loss
    x = _log_softmax_input(fn) if _is_nll(loss_func) else None
    net = SegmentFn.__new__(SegmentFn)
    net.__dict__.update(fn.__dict__)
    net.loss = None
    if x is None:

        def loss(y: Tensor) -> Tensor:
            return loss_func(y, target).reshape(())

        return OutputSplit(net, loss, folded=False)
    end = fn.end
    net.end = x
    net.nodes = [n for n in fn.nodes if n is not end]

    def loss_folded(y: Tensor) -> Tensor:
        env: dict[fx.Node, object] = dict(fn.baked)
        env[x] = y
        args = fx.node.map_arg(end.args, env.__getitem__)
        kwargs = fx.node.map_arg(end.kwargs, env.__getitem__)
        return loss_func(fn._run(end, args, kwargs, {}), target).reshape(())

    return OutputSplit(net, loss_folded, folded=True)
