"""The generalized Gauss-Newton (outer-product, Levenberg-Marquardt) matrix as an operator.

Bishop's eq. 8.39 splits the Hessian of a sum-of-squares error into the outer
product ``sum_n grad y_n grad y_n^T`` and a term weighted by the residuals;
the outer-product (Gauss-Newton) approximation keeps the first. For any loss
``l(y, t)`` of the network output ``y`` it is ``G = sum_n J_n^T Lambda_n J_n``
with ``J_n = d y_n / d theta`` and ``Lambda_n = d2 l / dy_n dy_n`` (positive
semi-definite for convex losses such as MSE and cross-entropy).

**Where the network ends** (:mod:`hessinv.ggn_split`). For a model (an
``nn.Sequential``, or any module :mod:`hessinv.trace` accepts) ``y`` is the
model's output, except that a final ``log_softmax`` followed by
``nn.NLLLoss`` is read as cross-entropy on the logits: NLL is linear in the
log-probabilities, so the literal Gauss-Newton matrix of that split is zero;
``y`` is then the input of the ``log_softmax`` and the loss
``NLL(log_softmax(y))``, which is what users of ``CrossEntropyLoss`` get. For
a functional pipeline (:meth:`GaussNewton.from_stages`) ``y`` is the last
stage's output and the loss is given separately.

**Three routes, chosen lazily.**

* The kernel form (:mod:`hessinv.kernel`; for a PSD loss Hessian, usually
  the cheapest, so what ``method="auto"`` picks): ``J`` by one backward pass
  per output coordinate, ``B = Lambda^{1/2} J``, and ``G @ v = B^T (B v)``,
  ``diagonal``, ``to_dense`` from ``B``; ``solve``, ``logdet`` and
  ``inertia`` from one SVD of ``B`` shared by all dampings. ``G`` is PSD,
  so the inertia never has negative entries for ``damping >= 0``.
  ``method="dense"`` forms ``G = B^T B`` from the same ``B``.
* The lifted system (``method="lifted"``): ``G`` is the Hessian of the same
  pipeline with every stage's second-derivative blocks set to zero except the
  loss's own curvature, which enters the last stage as ``Tzz = Jz^T Lambda Jz``,
  ``Tzx = Jz^T Lambda Jx``, ``Txx = sum_n Jx^T Lambda Jx``; those stage blocks
  (:func:`hessinv.ggn_blocks.ggn_blocks`) are built only when a lifted solve asks for them.
* Matrix-free products when ``J`` would exceed :data:`J_MEMORY_BUDGET`:
  ``G v = J^T (Lambda (J v))`` by one ``jvp`` and one ``vjp``.

Its gradient is the true gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from .derivatives import StageBlocks
from .errors import LiftedPrecisionWarning
from .ggn_blocks import ggn_blocks
from .ggn_split import OutputSplit, network_then_loss, output_split
from .grad_mode import recording
from .hessian import Hessian
from .kernel import (
    GaussNewtonKernel,
    KernelFactorization,
    kernel_cost,
    loss_output_hessians,
    output_jacobian,
    psd_sqrt,
)
from .pipeline import Pipeline, Stage, flatten_params, unflatten_params
from .progress import ProgressArg
from .solvers import Inertia
from .solves import _check_damping

__all__ = ["J_MEMORY_BUDGET", "GaussNewton", "OutputSplit", "ggn_blocks", "output_split"]

#: ``J`` (and ``B``) are materialized for products only below this many bytes.
J_MEMORY_BUDGET = 2**30


class GaussNewton(Hessian):
    """The generalized Gauss-Newton matrix ``G = sum_n J_n^T Lambda_n J_n`` of a model.

    Same interface as :class:`hessinv.Hessian`: ``GaussNewton(model, loss_func, X, y)``;
    ``@``, ``solve``, ``factor``, ``inverse``, ``logdet``, ``inertia``,
    ``to_dense``, ``diagonal``. A final ``nn.LogSoftmax`` with ``nn.NLLLoss``
    is treated as cross-entropy on the logits (module doc). ``G`` is positive
    semi-definite for convex losses (checked: the loss Hessian in the outputs
    must be PSD for the kernel route) and has rank at most ``N o``
    (``o`` the output width), so ``solve`` needs ``damping > 0`` when
    ``W > N o``.

    ``factor``/``solve``/``logdet``/``inertia`` take ``method="kernel"`` (the
    SVD of ``Lambda^{1/2} J``, :mod:`hessinv.kernel`), the methods of
    :class:`hessinv.Hessian`, or ``"auto"`` (the default: the cheapest exact
    method that fits in memory by :meth:`costs`, estimated without building
    any stage block; the kernel only when the loss Hessian is PSD).
    Nothing is computed at construction beyond a forward pass.

    Accepts every model :class:`hessinv.Hessian` accepts (``params=`` too) and
    functional pipelines through :meth:`from_stages`, whose last stage returns
    the network output and whose loss is given separately.
    """

    @classmethod
    def from_stages(
        cls,
        stages: Sequence[Stage],
        z0: Tensor,
        *,
        loss_func: Callable[..., Tensor] | None = None,
        y: Tensor | None = None,
        generic: bool = False,
        check_mixing: bool = True,
        max_memory: float | None = None,
        progress: ProgressArg = True,
    ) -> GaussNewton:
        """The Gauss-Newton matrix of a functional pipeline, with the loss given separately.

        Unlike :meth:`hessinv.Hessian.from_stages`, the stages compute the
        *network*: the last one returns the network output ``y`` (batch first),
        and ``G = sum_n J_n^T Lambda_n J_n`` with ``J_n = d y_n / d theta`` and
        ``Lambda_n`` the Hessian of ``loss_func`` in ``y_n``. The split is
        taken literally: a last stage ending in ``log_softmax`` with
        ``nn.NLLLoss`` gives ``G = 0`` (the loss is linear in its input);
        return the logits and use ``nn.CrossEntropyLoss`` instead.

        Args:
            stages: ``hessinv.Stage(fn, params)`` objects; each maps the batched
                state to the next, the last to the network output.
            z0: The input, batch first.
            loss_func: ``loss_func(output, y)`` (``loss_func(output)`` when
                ``y`` is ``None``): the scalar loss, a sum or mean of
                per-sample terms.
            y: The targets, batch first, or ``None``.
            generic: Unused for functional stages (always generic autodiff).
            check_mixing: Verify with random probes that no stage (the loss
                included) mixes samples (raises ``ValueError``).
            max_memory: As for :class:`hessinv.Hessian`.
            progress: As for :class:`hessinv.Hessian`.

        Raises:
            TypeError: No ``loss_func``, or a stage that is not a ``hessinv.Stage``.
            ValueError: As :meth:`hessinv.Hessian.from_stages`, for the pipeline
                with the loss appended to its last stage.
        """
        stages = network_then_loss(stages, loss_func, y)
        return super().from_stages(
            stages,
            z0,
            generic=generic,
            check_mixing=check_mixing,
            max_memory=max_memory,
            progress=progress,
        )

    # -- lazy state -------------------------------------------------------------
    def _compute_blocks(self, pipeline: Pipeline, generic: bool) -> tuple[Tensor, None]:
        """The loss only: stage blocks are built on demand (:attr:`blocks`)."""
        self._generic = generic
        self._split = output_split(pipeline)
        self._kern: GaussNewtonKernel | None = None
        self._lam: Tensor | None = None
        self._fwd_flops: float | None = None
        return pipeline.forward()[-1], None

    def _check_block_memory(self, pipeline: Pipeline) -> None:
        """Nothing at construction: the stage blocks are built (and checked) on first use."""

    @property
    def blocks(self) -> list[StageBlocks]:  # type: ignore[override]
        """The lifted Gauss-Newton stage blocks (:func:`ggn_blocks`), built on first use."""
        if getattr(self, "_blocks", None) is None:
            self._check_fresh()  # built from the kept forward pass: at the snapshot's parameters
            Hessian._check_block_memory(self, self.pipeline)
            # formed on first use, perhaps inside torch.inference_mode(): autograd must record
            self._blocks = recording(ggn_blocks)(self.pipeline, self._generic)[1]
        return self._blocks

    @blocks.setter
    def blocks(self, value: list[StageBlocks] | None) -> None:
        self._blocks = value

    def _flat(self) -> Tensor:
        return flatten_params(self.pipeline.params)

    def _net(self, flat: Tensor, z: Tensor) -> Tensor:
        """The network output for inputs ``z`` (batch first) at flat parameters ``flat``."""
        stages = self.pipeline.stages
        i = 0
        for l, st in enumerate(stages):  # noqa: E741
            p = unflatten_params(flat[i : i + st.num_params], st.params)
            i += st.num_params
            z = st.fn(z, p) if l < len(stages) - 1 else self._split.net_last(z, p)
        return z

    def output(self) -> Tensor:
        """The network output ``y`` (batch first) at the current parameters."""
        with torch.no_grad():
            return self._net(self._flat(), self.pipeline.z0)

    def loss_hessians(self) -> Tensor:
        """``Lambda_n``, the per-sample loss Hessians in the outputs, ``(N, o, o)`` (cached)."""
        self._check_fresh()
        return self._loss_hessians()

    def _loss_hessians(self) -> Tensor:
        """:meth:`loss_hessians` for callers that checked freshness already."""
        if self._lam is None:
            self._lam = loss_output_hessians(self._split.loss, self.output())
        return self._lam

    def kernel(self) -> GaussNewtonKernel:
        """``J`` (one backward pass per output coordinate) and ``B = Lambda^{1/2} J`` (cached)."""
        self._check_fresh()
        return self._kernel()

    def _kernel(self) -> GaussNewtonKernel:
        """:meth:`kernel` for callers that checked freshness already."""
        if self._kern is None:
            lam = self._loss_hessians()
            jac = output_jacobian(self._net, self._flat(), self.pipeline.z0)
            self._kern = GaussNewtonKernel(jac.detach(), lam)
        return self._kern

    def _kernel_fits(self) -> bool:
        n, o = self._loss_hessians().shape[:2]
        return 2 * n * o * self.num_params * self._itemsize() <= J_MEMORY_BUDGET

    def _itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def _loss_is_convex_here(self) -> bool:
        return psd_sqrt(self.loss_hessians())[0] is not None

    # -- operator basics ---------------------------------------------------------
    def gradient(self) -> Tensor:
        """The flat gradient of the loss (the true gradient), by reverse mode."""
        self._check_fresh()
        return grad(self.pipeline.loss_of_flat)(self._flat())

    def matmat(self, v: Tensor) -> Tensor:
        """``G V = J^T (Lambda (J V))`` for ``V`` of shape ``(W, k)``."""
        self._check_fresh()
        if self._kern is not None or self._kernel_fits():
            return self._kernel().matmat(v)
        return self._matmat_free(v)

    def _matmat_free(self, v: Tensor) -> Tensor:
        """``G V`` by one ``jvp`` and one ``vjp`` per column, without forming ``J``."""
        flat, z0 = self._flat(), self.pipeline.z0

        def net(f: Tensor) -> Tensor:
            return self._net(f, z0)

        y, pull_net = vjp(net, flat)
        _, pull_loss = vjp(grad(self._split.loss), y.detach())

        def col(t: Tensor) -> Tensor:
            jv = jvp(net, (flat,), (t,))[1]
            return pull_net(pull_loss(jv)[0])[0]

        return vmap(col)(v.T).T

    def to_dense(self) -> Tensor:
        """The ``W x W`` matrix ``G`` (from ``B``; exactly symmetric)."""
        self._check_fresh()
        return self._kernel().to_dense()

    def diagonal(self) -> Tensor:
        """The exact diagonal of ``G``: squared column norms of ``Lambda^{1/2} J``."""
        self._check_fresh()
        return self._kernel().diagonal()

    def block_diagonal(self) -> list[Tensor]:
        """The exact ``p_l x p_l`` diagonal blocks of ``G``, one per stage."""
        self._check_fresh()
        g = self._kernel()
        out, i = [], 0
        for p in self.pipeline.stage_sizes:
            if g.B is not None:
                b = g.B[:, i : i + p]
                out.append(b.T @ b)
            else:
                j = g.J[:, :, i : i + p]
                blk = torch.einsum("nap,naq->pq", j, g.L @ j)
                out.append(0.5 * (blk + blk.T))
            i += p
        return out

    # -- cost --------------------------------------------------------------------
    def _forward_flops(self) -> float:
        if self._fwd_flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc, torch.no_grad():
                y = self._net(self._flat(), self.pipeline.z0)
            self._fwd_flops = float(fc.get_total_flops()) + float(y.numel())
        return self._fwd_flops

    def kernel_cost(self) -> dict[str, float]:
        """``{"flops", "bytes"}`` of the kernel route from scratch.

        :func:`hessinv.kernel.kernel_cost`; needs one forward pass (counted by
        ``torch.utils.flop_counter``), no ``J``.
        """
        o = self.output()[0].numel()
        n = self.pipeline.batch_size
        return kernel_cost(n, o, self.num_params, self._forward_flops(), self._itemsize())

    def costs(self) -> dict[str, tuple[float, float]]:
        """``method -> (flops, bytes)`` for GN's exact methods, no stage block built.

        ``kernel`` (only when the loss Hessian is PSD): :meth:`kernel_cost`.
        ``lifted``: the stage blocks (:func:`hessinv.solvers.select.block_memory`)
        and the panel factorizations of the lifted system (as
        :func:`hessinv.solvers.select.lifted_cost`, with every stage keeping
        ``min(p_l, N (a_l + a_{l-1}))`` directions), from the activation shapes.
        ``dense``: ``J`` and ``G = B^T B`` (``2 N o W^2``) plus its
        eigendecomposition (``9 W^3``); memory ``J``, ``B`` and ``3 W^2``.
        """
        from .solvers import select as _select

        if getattr(self, "_costs", None) is not None:
            return dict(self._costs)
        zs = self.pipeline.forward()
        n = self.pipeline.batch_size
        o = self.output()[0].numel()
        w = float(self.num_params)
        item = self._itemsize()
        sizes: list[int] = []
        st = self.pipeline.stages
        for l, s in enumerate(st):  # noqa: E741
            a_in = zs[l][0].numel() if l else 0
            if l == len(st) - 1:
                sizes.append(min(s.num_params, n * (o + a_in)))
            else:
                a = zs[l + 1][0].numel()
                sizes += [min(s.num_params, n * (a + a_in)) + n * a, n * a]
        flops, factor_bytes = _select.lifted_cost_of_sizes(sizes, item)
        lifted_bytes = factor_bytes + _select.block_memory(self.pipeline, zs)
        kc = self.kernel_cost()
        out = {
            "lifted": (flops, lifted_bytes),
            "dense": (
                kc["flops"] + 2.0 * n * o * w * w + 9.0 * w**3,
                2.0 * n * o * w * item + 3.0 * w * w * item,
            ),
        }
        if self._loss_is_convex_here():
            out["kernel"] = (kc["flops"], kc["bytes"])
        self._costs = out
        return dict(out)

    def _known_methods(self) -> list[str]:
        return sorted([*super()._known_methods(), "kernel"])

    # -- factorizations ----------------------------------------------------------
    def _factorization_class(self, name: str):  # noqa: ANN202
        """``"kernel"``: :class:`hessinv.kernel.KernelFactorization` (PSD loss Hessian only).

        Raises:
            ValueError: ``"kernel"`` with a loss whose Hessian in the outputs is
                not PSD (use ``"lifted"``).
        """
        if name == "kernel":
            self.kernel_or_raise()
            return KernelFactorization
        return super()._factorization_class(name)

    def inverse_diagonal(self, damping: float = 0.0) -> Tensor:
        """``diag((G + damping I)^{-1})``, by the cheaper exact route.

        The kernel's SVD (:meth:`hessinv.kernel.KernelFactorization.inverse_diagonal`)
        where :meth:`costs` rates it below the lifted system and it fits in memory, else
        selected inversion.
        """
        from .solvers import select as _select

        c = self.costs()
        kern = c.get("kernel")
        fits = kern is not None and kern[1] <= _select.memory_budget(self.device, self.max_memory)
        if fits and kern[0] <= c["lifted"][0]:
            return self.factor(damping, method="kernel").inverse_diagonal()
        return super().inverse_diagonal(damping)

    def kernel_or_raise(self) -> None:
        """Raise ``ValueError`` (use method='lifted') unless the loss Hessian is PSD."""
        if not self._loss_is_convex_here():
            _, ratio = psd_sqrt(self.loss_hessians())
            raise ValueError(
                "the loss Hessian in the network outputs is not positive semi-definite "
                f"(most negative eigenvalue {ratio:.2e} times the largest): a non-convex "
                "loss has no Gauss-Newton kernel form; use method='lifted'"
            )

    def inertia(self, damping: float = 0.0, method: str = "auto") -> Inertia:
        """``(pos, neg, zero)`` of ``G + damping I`` (:class:`hessinv.solvers.Inertia`).

        The kernel counts an eigenvalue ``s_i^2 + damping`` (or ``damping``
        for the ``W - N o`` directions outside the row space of ``J``) as zero
        when it is within ``W eps ||G + dI||`` of zero (:mod:`hessinv.kernel`).
        Another method that reports negative entries for ``damping >= 0``
        although the loss Hessian is PSD (the lifted count on a singular system
        can) is overruled by the kernel, with a
        :class:`~hessinv.errors.LiftedPrecisionWarning`.
        """
        d = _check_damping(damping)
        r = super().inertia(d, method)
        if d >= 0 and r.negative > 0 and self._loss_is_convex_here():
            # G is PSD (L is): a negative count is round-off of another method on a
            # singular system, not a property of G. Answer with the kernel, or refuse.
            msg = (
                f"the inertia {tuple(r)} of G + {d:g} I ({r.how}) has negative entries, but G "
                "is positive semi-definite (its loss Hessian in the outputs is)"
            )
            if not self._kernel_fits():
                raise torch.linalg.LinAlgError(msg + "; increase damping")
            warnings.warn(msg + "; returning the kernel's count", LiftedPrecisionWarning, 2)
            return self.factor(d, "kernel").inertia()
        return r
