"""Functional forms of ``torch.nn`` modules and the ``nn.Sequential`` adapter.

Each module that has trainable parameters starts a stage; the parameter-free
modules after it join that stage; the loss joins the last stage. Modules
before the first parametrised one are applied to the input once.

PyTorch's fused ``layer_norm`` returns wrong mixed second derivatives
(pytorch#196700: the Hessian of a Linear-LayerNorm-Tanh-Linear net comes out
asymmetric); :func:`layer_norm` (in :mod:`hessinv.derivatives.norm`) is written
with elementary operations so that every derivative of it, of any order, is right.

Which modules the adapter takes, and which of them are elementwise, come from
the derivatives registry (:mod:`hessinv.derivatives.registry`): one list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .derivatives import ElementwiseDerivatives, is_known, layer_norm, registered
from .derivatives.elementwise import celu
from .model_checks import (
    check_container_hooks,
    check_leaf,
    check_params_covered,
    check_untied,
    leaf_modules,
    out_of_place,
)
from .module_params import all_buffers, all_parameters, trainable
from .pipeline import Stage, check_dtype
from .staleness import ParameterSource

__all__ = ["layer_norm"]  # re-exported: its home is hessinv.derivatives.norm


def _registered_where(pred: Callable[[type, type], bool]) -> tuple[type[nn.Module], ...]:
    return tuple(t for t, cls in registered().items() if pred(t, cls))


def _param_free(t: type) -> bool:
    return not issubclass(t, PARAMETRISED_TYPES)


#: Parametrised ``torch.nn`` layer types (they start a stage) among the registered ones.
PARAMETRISED_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.PReLU,
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
)
#: Modules applied coordinate by coordinate (or a per-sample reshape): their
#: Jacobian is diagonal in the flattened per-sample coordinates. Derived from
#: the registry (:mod:`hessinv.derivatives`): the built-in elementwise classes.
ELEMENTWISE = _registered_where(
    lambda t, cls: (
        issubclass(cls, ElementwiseDerivatives)
        and not issubclass(t, (nn.modules.dropout._DropoutNd, nn.Flatten, nn.Unflatten))
    )
)
#: Parameter-free modules that act within each sample but mix its coordinates.
PER_SAMPLE = _registered_where(
    lambda t, cls: (
        _param_free(t)
        and t not in ELEMENTWISE
        and not issubclass(t, (nn.modules.dropout._DropoutNd, nn.Flatten))
    )
)
#: Parametrised modules with a closed-form derivative class.
STRUCTURED = _registered_where(lambda t, cls: issubclass(t, PARAMETRISED_TYPES) and cls.closed_form)
#: Parametrised modules handled by generic autodiff of a correct functional form.
GENERIC_PARAM = _registered_where(
    lambda t, cls: issubclass(t, PARAMETRISED_TYPES) and not cls.closed_form
)
LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss, nn.NLLLoss)


def _is_flatten_per_sample(m: nn.Module) -> bool:
    return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1


def _is_dropout(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.dropout._DropoutNd, nn.AlphaDropout))


def check_module(m: nn.Module) -> None:
    """Refuse modules that would make the Hessian wrong.

    Raises:
        ValueError: A module in training mode that is random or uses batch
            statistics (Dropout, BatchNorm), a fused instance norm, a
            recurrent module, or any module hessinv does not know.
    """
    name = type(m).__name__
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
        raise ValueError(
            f"{name} in training mode mixes samples through batch statistics; "
            "call model.eval() first"
        )
    if _is_dropout(m):
        if m.training and m.p > 0:
            raise ValueError(f"{name} in training mode is random; call model.eval() first")
        return
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        raise ValueError(
            f"{name} is not supported: torch's fused instance_norm has wrong second "
            "derivatives; write it as a hessinv.Stage from elementary operations"
        )
    if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
        raise ValueError(f"{name} is recurrent (stateful across steps) and not supported")
    if isinstance(m, nn.Embedding) and m.max_norm is not None:
        raise ValueError(
            f"{name} has max_norm: it rescales its weight in place during forward; "
            "hessinv needs a forward without side effects"
        )
    if not sequential_known(m):
        raise ValueError(
            f"module {name} is not supported by the nn.Sequential adapter (no derivatives "
            "class is registered for it: see hessinv.derivatives.register); "
            "wrap it in a hessinv.Stage(fn, params) instead"
        )


def sequential_known(m: nn.Module) -> bool:
    """True when the ``nn.Sequential`` adapter takes ``m``.

    That is a module with a registered derivatives class (or a subclass that
    keeps its ``forward``), built-in or registered by the user; ``Bilinear``
    (two inputs) is for traced models only.
    """
    return is_known(m) and not isinstance(m, nn.Bilinear)


def flatten_sequential(model: nn.Module) -> list[nn.Module]:
    """The leaf modules of a (nested) ``nn.Sequential``, in order.

    Raises:
        ValueError: A container whose ``forward`` is not a plain chain
            (:func:`hessinv.model_checks.check_plain_sequential`).
    """
    return [m for _, m in leaf_modules(model)]


def layer_function(m: nn.Module) -> Callable[[Tensor, tuple[Tensor, ...]], Tensor]:
    """``fn(z, params)`` for a parametrised module, ``params`` its trainable tensors."""
    names = [n for n, _ in trainable(m)]

    def get(params: tuple[Tensor, ...], name: str) -> Tensor | None:
        if name in names:
            return params[names.index(name)]
        return getattr(m, name, None)

    if isinstance(m, nn.LayerNorm):
        shape = tuple(m.normalized_shape)

        def fn(z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
            return layer_norm(z, shape, get(params, "weight"), get(params, "bias"), m.eps)

        return fn
    if isinstance(m, nn.Linear):

        def fn(z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
            return F.linear(z, get(params, "weight"), get(params, "bias"))

        return fn

    def fn(z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        return torch.func.functional_call(m, dict(zip(names, params, strict=True)), (z,))

    return fn


def loss_reduction_check(loss_func: Callable[..., Tensor]) -> None:
    """Refuse a loss module whose reduction is not ``"sum"`` or ``"mean"``."""
    red = getattr(loss_func, "reduction", None)
    if red is not None and red not in ("sum", "mean"):
        raise ValueError(f"loss reduction must be 'sum' or 'mean', got {red!r}")
    if isinstance(loss_func, nn.Module) and not isinstance(loss_func, LOSSES):
        # Any other loss module is accepted as a callable, but must be deterministic.
        if _is_dropout(loss_func):
            raise ValueError("a dropout module is not a loss")


@dataclass
class StageStructure:
    """What the ``nn.Sequential`` adapter knows about a stage (for fast paths).

    Attributes:
        layer: The parametrised module that starts the stage.
        layer_fn: Its functional form ``fn(z, params)``.
        tail: The parameter-free modules after it, in order.
        elementwise_tail: True if every tail module is elementwise.
        loss: ``(loss_func, target)`` for the last stage, else ``None``.
        sources: The model's parameters behind the stage's tensors, with their
            qualified names (for :class:`hessinv.staleness.ParameterSnapshot`).
    """

    layer: nn.Module
    layer_fn: Callable[[Tensor, tuple[Tensor, ...]], Tensor]
    tail: list[nn.Module] = field(default_factory=list)
    elementwise_tail: bool = True
    loss: tuple[Callable[..., Tensor], Tensor] | None = None
    sources: list[ParameterSource] | None = None

    def net_fn(self, y: Tensor) -> Tensor:
        """Apply the parameter-free tail, without the loss.

        ``nn.CELU`` runs from elementary operations (:func:`hessinv.derivatives.elementwise.celu`):
        torch's own backward rounds ``1/alpha`` to float32.
        """
        for m in self.tail:
            y = celu(y, m.alpha) if type(m) is nn.CELU else m(y)
        return y

    def tail_fn(self, y: Tensor) -> Tensor:
        """Apply the parameter-free tail (and the loss, for the last stage)."""
        y = self.net_fn(y)
        if self.loss is not None:
            loss_func, target = self.loss
            y = loss_func(y, target)
        return y


class FrozenModule(nn.Module):
    """A module whose parameters are all constants here (left out of ``params=``).

    Runs the module with detached parameters, so that nothing computed from it
    joins the caller's autograd graph; LayerNorm from elementary operations.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "inner", inner)  # not registered: no parameters here

    def forward(self, y: Tensor) -> Tensor:
        """``inner(y)`` with its parameters detached."""
        m = self.inner
        consts = {n: p.detach() for n, p in m.named_parameters()}
        if isinstance(m, nn.LayerNorm):
            w, b = consts.get("weight"), consts.get("bias")
            return layer_norm(y, tuple(m.normalized_shape), w, b, m.eps)
        return torch.func.functional_call(m, consts, (y,))


def _is_elementwise(m: nn.Module) -> bool:
    return isinstance(m, ELEMENTWISE) or _is_dropout(m) or _is_flatten_per_sample(m)


def _check_data_dtype(t: Tensor, what: str) -> None:
    if isinstance(t, Tensor) and (t.dtype.is_floating_point or t.dtype.is_complex):
        check_dtype(t.dtype, what)


def _sources(modules: list[tuple[str, nn.Module]]) -> list[ParameterSource]:
    """Every tensor of ``modules`` that ``H`` depends on, and where it lives.

    The trainable parameters, and the constants: frozen parameters and buffers
    (e.g. a BatchNorm's running statistics). A change to any of them makes an
    operator stale (:class:`hessinv.staleness.ParameterSnapshot`).
    """
    out = []
    for mod_name, m in modules:
        if isinstance(m, FrozenModule):
            m = m.inner  # noqa: PLW2901 - its parameters are constants of H
        for attr, t in [*all_parameters(m), *all_buffers(m)]:
            owner_path, _, leaf = attr.rpartition(".")
            owner = m.get_submodule(owner_path) if owner_path else m
            name = f"{mod_name}.{attr}" if mod_name else attr
            out.append(ParameterSource(name, t, owner, leaf))
    return out


def stages_from_sequential(
    model: nn.Module,
    loss_func: Callable[..., Tensor],
    X: Tensor,
    y: Tensor,
    *,
    frozen: set[int] | frozenset[int] = frozenset(),
) -> tuple[list[Stage], Tensor]:
    """Split ``model`` into stages; return them and the input ``z0``.

    Args:
        model: An ``nn.Sequential`` (nested ones are flattened) or one module.
        loss_func: ``loss_func(output, y)``, reduction ``"sum"`` or ``"mean"``.
        X: The inputs, batch first.
        y: The targets, batch first.
        frozen: The ids of modules whose parameters are all constants here
            (left out of a ``params=`` selection): they act as parameter-free.

    Raises:
        ValueError: An unsupported or unsafe module, a model without trainable
            parameters, a loss reduction other than sum/mean, tied weights, a
            parametrized or hooked module, a container or module whose
            ``forward`` is overridden (:mod:`hessinv.model_checks`), or a module
            before the first stage that fails on ``X``.
        TypeError: ``X`` or ``y`` of a dtype other than float32/float64
            (integer targets are fine).

    In-place activations are replaced by out-of-place copies inside the
    stages (the user's modules are not changed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_func):
        raise TypeError("loss_func must be callable")
    loss_reduction_check(loss_func)
    _check_data_dtype(X, "X")
    _check_data_dtype(y, "y")
    named = leaf_modules(model)
    for name, m in named:
        check_module(m)
        check_leaf(m, name)
    check_untied(model)
    check_container_hooks(model)
    check_params_covered(model, named)
    z0 = X
    before: list[tuple[str, nn.Module]] = []  # applied to X once, before the first stage
    groups: list[list[tuple[str, nn.Module]]] = []
    named = [(name, FrozenModule(m) if id(m) in frozen else m) for name, m in named]
    for name, m in named:
        if trainable(m):
            groups.append([(name, m)])
        elif groups:
            groups[-1].append((name, m))
        else:
            before.append((name, m))
            try:
                with torch.no_grad():
                    z0 = out_of_place(m)(z0)
            except Exception as e:
                raise ValueError(
                    f"module '{name}' ({m!r}), applied to the input before the first "
                    f"parametrised module, failed on input of shape {tuple(z0.shape)}: "
                    f"{type(e).__name__}: {e}"
                ) from e
    if not groups:
        raise ValueError("the model has no trainable parameters")
    stages = []
    for i, group in enumerate(groups):
        layer, tail = group[0][1], [out_of_place(m) for _, m in group[1:]]
        st = StageStructure(
            layer=layer,
            layer_fn=layer_function(layer),
            tail=tail,
            elementwise_tail=all(_is_elementwise(t) for t in tail),
            loss=(loss_func, y) if i == len(groups) - 1 else None,
            sources=_sources((before if i == 0 else []) + group),
        )

        def fn(z: Tensor, params: tuple[Tensor, ...], st: StageStructure = st) -> Tensor:
            return st.tail_fn(st.layer_fn(z, params))

        params = tuple(p.detach() for _, p in trainable(layer))
        stages.append(Stage(fn, params, structure=st))
    return stages, z0.detach()
