"""Per-layer derivative classes and the registry ``module type -> derivatives class``.

As in BackPACK's ``core/derivatives``, each layer type has one class that
knows its derivatives in closed form, with flags that say what is zero or
structured. For a module ``y = m(z; x)`` acting on each sample (input ``z`` of
``a_in`` coordinates per sample, parameters ``x`` of ``p`` scalars, output
cotangent ``b``), a class gives, per sample:

==================  ===================  ======================================
method              shape                meaning
==================  ===================  ======================================
``jac_z``           ``(N, a_out, a_in)``  ``dy / dz``
``df``              ``(N, a)``            its diagonal (``jacobian_is_diagonal``)
``hess_zz(b)``      ``(N, a_in, a_in)``   ``d2 (b.y) / dz dz``
``d2f``             ``(N, a)``            ``d2 y_i / dz_i^2`` (``hessian_is_diagonal``)
``jac_x``           ``(N, a_out, p)``     ``dy / dx``
``hess_zx(b)``      ``(N, a_in, p)``      ``d2 (b.y) / dz dx``
``hess_xx(b)``      ``(p, p)``            ``sum_n d2 (b.y) / dx dx``
==================  ===================  ======================================

Flags (class attributes; ``True`` is a promise the tests check):
``hessian_is_zero`` (``d2 y / dz2 = 0``: a map linear, or piecewise linear,
in ``z``), ``hessian_is_diagonal``, ``jacobian_is_diagonal`` (a coordinate-wise
map), ``params_linear`` (``y`` linear in ``x``: ``hess_xx = 0``, and the rows
of ``jac_x`` span the parameter directions the stage sees).

``params`` is always the tuple of the module's parameters in
``named_parameters()`` order (all of them: a closed form whose module has a
parameter outside the selection is not used, see :meth:`ModuleDerivatives.applies`).

Lookup (:func:`derivatives_class`) is by exact type, then along the MRO, but a
subclass is matched to a base's class only when it keeps that base's
``forward`` (a subclass with its own forward is generic). A module without a
class, or whose options the class does not cover, gets generic autodiff
(:class:`~hessinv.derivatives.autodiff.AutodiffDerivatives`): exact, slower.

Registering a closed form for one's own module::

    import hessinv
    from hessinv.derivatives import ElementwiseDerivatives, register

    class Cube(torch.nn.Module):
        def forward(self, z):
            return z**3

    @register(Cube)
    class CubeDerivatives(ElementwiseDerivatives):
        def df(self, z, params):
            return 3 * z**2

        def d2f(self, z, params):
            return 6 * z
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

#: ``module type -> derivatives class``.
_REGISTRY: dict[type[nn.Module], type[ModuleDerivatives]] = {}


def flat(t: Tensor) -> Tensor:
    """``(N, ...) -> (N, a)``."""
    return t.reshape(t.shape[0], -1)


class ModuleDerivatives:
    """Derivatives of one module ``y = m(z; x)``, per sample (see module doc).

    Subclasses implement the methods their flags leave open. The defaults:
    ``jac_z`` from ``df`` for diagonal Jacobians, ``hess_zz`` zero or from
    ``d2f`` by the flags, ``forward`` by calling the module with ``params``.

    Args:
        module: The module (its options; parameters come as ``params``).
    """

    closed_form: ClassVar[bool] = True
    jacobian_is_diagonal: ClassVar[bool] = False
    hessian_is_zero: ClassVar[bool] = False
    hessian_is_diagonal: ClassVar[bool] = False
    params_linear: ClassVar[bool] = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    #: The parameters the closed form takes, in the order it takes them (``None``: any).
    param_names: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    def applies(cls, module: nn.Module, z: Tensor) -> bool:
        """True when the closed form covers this module's options and input ``z``."""
        return True

    @classmethod
    def covers(cls, module: nn.Module, z: Tensor) -> bool:
        """A closed form that applies, with ``module``'s parameters in :attr:`param_names` order.

        A module's parameters come in its registry's order, which is not always
        the class's: ``prune.remove`` re-registers ``weight`` after ``bias``.
        """
        if not cls.closed_form:
            return False
        if cls.param_names is not None:
            have = [n for n, p in module._parameters.items() if p is not None]
            if have != [n for n in cls.param_names if n in have]:
                return False
        return cls.applies(module, z)

    def forward(self, z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        """The module's output with ``params`` in place of its parameters."""
        names = [n for n, _ in self.module.named_parameters()]
        if not names:
            return self.module(z)
        return torch.func.functional_call(self.module, dict(zip(names, params, strict=True)), (z,))

    def df(self, z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        """The diagonal of ``dy/dz``, ``(N, a)`` (``jacobian_is_diagonal`` classes)."""
        raise NotImplementedError(f"{type(self).__name__}.df")

    def d2f(self, z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        """``d2 y_i / dz_i^2``, ``(N, a)`` (``hessian_is_diagonal`` classes)."""
        raise NotImplementedError(f"{type(self).__name__}.d2f")

    def jac_z(self, z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        """``dy/dz`` per sample, ``(N, a_out, a_in)``."""
        if self.jacobian_is_diagonal:
            return torch.diag_embed(flat(self.df(z, params)))
        raise NotImplementedError(f"{type(self).__name__}.jac_z")

    def hess_zz(self, z: Tensor, params: tuple[Tensor, ...], b: Tensor) -> Tensor | None:
        """``d2 (b.y) / dz dz`` per sample, ``(N, a_in, a_in)``; ``None`` when zero."""
        if self.hessian_is_zero:
            return None
        if self.hessian_is_diagonal:
            return torch.diag_embed(flat(b) * flat(self.d2f(z, params)))
        raise NotImplementedError(f"{type(self).__name__}.hess_zz")

    def jac_x(self, z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        """``dy/dx`` per sample, ``(N, a_out, p)``."""
        raise NotImplementedError(f"{type(self).__name__}.jac_x")

    def hess_zx(self, z: Tensor, params: tuple[Tensor, ...], b: Tensor) -> Tensor:
        """``d2 (b.y) / dz dx`` per sample, ``(N, a_in, p)``."""
        raise NotImplementedError(f"{type(self).__name__}.hess_zx")

    def hess_xx(self, z: Tensor, params: tuple[Tensor, ...], b: Tensor) -> Tensor | None:
        """``sum_n d2 (b.y) / dx dx``, ``(p, p)``; ``None`` when zero."""
        if self.params_linear:
            return None
        raise NotImplementedError(f"{type(self).__name__}.hess_xx")

    def tail_step(
        self, z: Tensor, params: tuple[Tensor, ...], b: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """One module of a stage's parameter-free tail, for the chain rule.

        Args:
            z: The module's input (batched, its own shape).
            params: Its parameters (constants here).
            b: The cotangent of its output, ``(N, a_out)``.

        Returns:
            ``(J, T, b_in)``: ``J`` the Jacobian, ``(N, a)`` for a diagonal one or
            ``(N, a_out, a_in)``; ``T = d2 (b.y)/dz dz`` as ``None`` (zero),
            ``(N, a)`` (diagonal) or ``(N, a_in, a_in)``; ``b_in = J^T b``.
        """
        if self.jacobian_is_diagonal:
            jac = flat(self.df(z, params)).expand(b.shape)
            b_in = jac * b
        else:
            jac = self.jac_z(z, params)
            b_in = (jac.transpose(1, 2) @ b.unsqueeze(-1)).squeeze(-1)
        if self.hessian_is_zero:
            curv = None
        elif self.hessian_is_diagonal:
            curv = b * flat(self.d2f(z, params))
        else:
            curv = self.hess_zz(z, params, b)
        return jac, curv, b_in


class ElementwiseDerivatives(ModuleDerivatives):
    """A coordinate-wise map ``y_i = phi(z_i)``: implement ``df`` and ``d2f``.

    ``Jz = diag(phi')``, ``Tzz = diag(b phi'')``. Without overrides, ``phi'``
    and ``phi''`` come from autodiff (``grad`` of a sum, exact because the
    Jacobian is diagonal).
    """

    jacobian_is_diagonal = True
    hessian_is_diagonal = True

    def _phi(self, q: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        return self.forward(q, params)

    def df(self, z: Tensor, params: tuple[Tensor, ...]) -> Tensor:  # noqa: D102
        return torch.func.grad(lambda q: self._phi(q, params).sum())(z)

    def d2f(self, z: Tensor, params: tuple[Tensor, ...]) -> Tensor:  # noqa: D102
        def d1(q: Tensor) -> Tensor:
            return torch.func.grad(lambda r: self._phi(r, params).sum())(q)

        return torch.func.grad(lambda q: d1(q).sum())(z)


class PiecewiseLinearElementwise(ElementwiseDerivatives):
    """A coordinate-wise map that is linear between kinks: ``d2f = 0``."""

    hessian_is_zero = True


def register(module_type: type[nn.Module], derivatives: type[ModuleDerivatives] | None = None):  # noqa: ANN201
    """Register ``derivatives`` as the closed form of ``module_type``.

    Use as ``register(MyModule, MyDerivatives)`` or as a class decorator
    ``@register(MyModule)``. A later registration replaces an earlier one.

    Raises:
        TypeError: ``module_type`` is not an ``nn.Module`` class, or the class
            is not a :class:`ModuleDerivatives`.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register: module_type must be an nn.Module class, got {module_type!r}")

    def deco(cls: type[ModuleDerivatives]) -> type[ModuleDerivatives]:
        if not (isinstance(cls, type) and issubclass(cls, ModuleDerivatives)):
            raise TypeError(
                f"register({module_type.__name__}): the derivatives class must subclass "
                f"hessinv.derivatives.ModuleDerivatives, got {cls!r}"
            )
        _REGISTRY[module_type] = cls
        return cls

    return deco if derivatives is None else deco(derivatives)


def unregister(module_type: type[nn.Module]) -> None:
    """Remove ``module_type``'s registration (no error if absent)."""
    _REGISTRY.pop(module_type, None)


def derivatives_class(module: nn.Module) -> type[ModuleDerivatives] | None:
    """The class registered for ``module``: exact type, then the MRO with the same ``forward``."""
    t = type(module)
    cls = _REGISTRY.get(t)
    if cls is not None:
        return cls
    for base in t.__mro__[1:]:
        cls = _REGISTRY.get(base)
        if cls is not None and getattr(t, "forward", None) is getattr(base, "forward", None):
            return cls
    return None


def registered_types() -> tuple[type[nn.Module], ...]:
    """Every registered module type, in registration order."""
    return tuple(_REGISTRY)


def registered() -> dict[type[nn.Module], type[ModuleDerivatives]]:
    """A copy of the registry, ``module type -> derivatives class``."""
    return dict(_REGISTRY)


def is_known(module: nn.Module) -> bool:
    """True when ``module`` has a registered class (closed form or generic)."""
    return derivatives_class(module) is not None
