"""Checks and value recording for a traced forward (:mod:`hessinv.fxgraph`).

:func:`check_graph` refuses unsafe modules and functions before anything runs;
:func:`check_deterministic` refuses a forward that is random or that its trace does
not reproduce; :func:`record` runs the graph once, keeping every node's value.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .layers import check_module

#: Modules refused (or accepted in eval mode) by :func:`hessinv.layers.check_module`:
#: kept as leaves so that the refusal names them.
CHECKED = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
    nn.AlphaDropout,
    nn.modules.instancenorm._InstanceNorm,
    nn.RNNBase,
    nn.RNNCellBase,
)
#: Functions whose second derivatives torch gets wrong, refused.
_WRONG = {F.instance_norm: "instance_norm", torch.instance_norm: "instance_norm"}


def check_graph(model: nn.Module, graph: fx.Graph) -> fx.Node:
    """Refuse unsafe modules and functions; return the single placeholder."""
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(phs) != 1:
        names = [n.target for n in phs]
        raise ValueError(f"the model's forward takes {len(phs)} inputs {names}; hessinv needs one")
    for n in graph.nodes:
        if n.op == "call_module":
            m = model.get_submodule(n.target)
            if isinstance(m, CHECKED):
                check_module(m)  # raises for training-mode dropout/batch norm, instance norm, RNN
            if isinstance(m, nn.Embedding) and m.max_norm is not None:
                raise ValueError(
                    f"Embedding {n.target} has max_norm: it rescales its weight in place during "
                    "forward; hessinv needs a forward without side effects"
                )
        elif n.op == "call_function" and n.target in _WRONG:
            raise ValueError(
                f"{_WRONG[n.target]} (node {n.name}) is not supported: torch's fused kernel has "
                "wrong second derivatives; write it from elementary operations"
            )
    return phs[0]


def check_deterministic(model: nn.Module, gm: fx.GraphModule, x: Tensor, out: object) -> None:
    """Refuse a forward that is random, or that its trace does not reproduce.

    A random operation written into ``forward`` (``F.dropout(x, p, training=True)``,
    ``torch.randn_like``, ``x.bernoulli()``) would leave an operator built from one draw of
    the randomness; a random tensor made from constants is even drawn once at trace time
    and baked into the graph. So the graph runs once more, and the model itself once: any
    difference beyond ``sqrt(eps)`` relative (far above a reordering of sums, far below a
    random draw) is refused.
    """
    if not isinstance(out, Tensor) or not out.is_floating_point():
        return
    res = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    again = record(gm, x)[res]
    with torch.no_grad():
        direct = model(x)
    tol = torch.finfo(out.dtype).eps ** 0.5
    finite = out[torch.isfinite(out)]  # NaN/inf are left to the non-finite checks downstream
    atol = tol * float(finite.abs().max()) if finite.numel() else 0.0
    for other in (again, direct):
        if not (
            isinstance(other, Tensor)
            and other.shape == out.shape
            and torch.allclose(out, other, rtol=tol, atol=atol, equal_nan=True)
        ):
            raise ValueError(
                f"{type(model).__name__}.forward is random, or its torch.fx trace does not "
                "reproduce it: two calls on the same input differ (a dropout with "
                "training=True, torch.rand*/randn_like, bernoulli, state kept in Python, ...). "
                "The Hessian of one random draw is not the model's: call model.eval() and keep "
                "forward deterministic"
            )


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        self.values[n] = out
        return out


def record(gm: fx.GraphModule, x: Tensor) -> dict[fx.Node, object]:
    """Run ``gm`` on ``x`` without autograd; every node's value."""
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(x)
    return rec.values
