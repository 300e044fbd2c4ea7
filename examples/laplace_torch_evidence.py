"""laplace-torch's full-GGN Laplace evidence on hessinv's exact log-determinant.

laplace-torch (``pip install --no-deps laplace-torch``, see the README) computes
the Laplace log marginal likelihood

``log p(D) ~ log p(D | w) - 1/2 (log det P - log det P_0) - 1/2 w^T P_0 w``

with the posterior precision ``P = c G + lam I``: ``G`` the generalized
Gauss-Newton matrix of its loss (``1/2 sum (f - y)^2`` for regression,
cross-entropy with ``reduction="sum"`` for classification), ``c = 1 /
(sigma_noise^2 temperature)``, ``P_0 = lam I``. Its ``FullLaplace`` forms ``P``
densely (``W x W``: 8 W^2 bytes, ``O(W^3)`` for the log-determinant).

:class:`ExactGGNLaplace` below is a laplace-torch ``ParametricLaplace`` that
never forms ``P``: ``fit`` keeps the data, and ``log_det_posterior_precision``
is hessinv's exact

``log det P = W log c + log det(G + (lam / c) I)``  (``GaussNewton.logdet``),

differentiable in ``lam`` and ``sigma_noise`` with the exact gradients
``d/d lam = tr(P^{-1}) = tr((G + dI)^{-1}) / c`` and
``d/d c = tr(P^{-1} G) = (W - d tr((G + dI)^{-1})) / c`` (``d = lam / c``,
the trace from hessinv's selected inversion, ``inverse_diagonal``), so
laplace-torch's own ``log_marginal_likelihood`` and
``optimize_prior_precision(method="marglik")`` run on it unchanged.

The script checks it against laplace-torch's ``FullLaplace`` on a small
network (the evidence, its gradient, the optimized prior precision), then
evaluates the exact evidence of a network whose ``P`` laplace-torch could not
store (``W`` = 100,000: ``P`` alone would take 80 GB).

Run: ``python examples/laplace_torch_evidence.py``.
"""

from __future__ import annotations

import copy
import math
import time
import warnings

import torch
from torch import Tensor, nn

import hessinv

try:
    from laplace.baselaplace import ParametricLaplace
except ImportError:  # laplace-torch is optional
    ParametricLaplace = None

INSTALL = (
    "laplace-torch is not installed; install it without its dependencies (its torchvision "
    "pin would replace torch): pip install --no-deps laplace-torch==0.3 asdfghjkl==0.1a4 "
    "curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 torchmetrics lightning-utilities "
    "einops einconv linear_operator unfoldNd opt_einsum"
)


def _trace_inverse(ggn: hessinv.GaussNewton, d: float) -> float:
    """``tr((G + dI)^{-1})``, exact.

    From the kernel form ``G = B^T B`` (the SVD of ``B`` that ``logdet`` already
    computed): ``sum_i 1 / (s_i^2 + d) + (W - k) / d`` over the ``k`` singular
    values ``s_i`` of ``B``; by selected inversion (``inverse_diagonal``) where
    the kernel form does not apply.
    """
    try:
        ggn.kernel_or_raise()
    except ValueError:  # a loss Hessian that is not PSD: no kernel form
        return float(ggn.inverse_diagonal(d).sum())
    s2, _ = ggn.kernel().svd()
    return float((1.0 / (s2 + d)).sum()) + (ggn.num_params - s2.shape[0]) / d


class _ExactLogdet(torch.autograd.Function):
    """``log det(c G + lam I)`` from hessinv, with its exact gradients in ``lam`` and ``c``."""

    @staticmethod
    def forward(lam: Tensor, c: Tensor, ggn: hessinv.GaussNewton) -> Tensor:  # noqa: D102
        d = float(lam) / float(c)
        sign, logabs = ggn.logdet(d)
        if sign <= 0:  # G is PSD: lam <= 0, or lam / c below round-off of ||G||
            raise ValueError(
                f"the posterior precision c G + lam I (lam = {float(lam):.3g}, c = "
                f"{float(c):.3g}) is not positive definite to working precision: use a "
                "positive prior precision that is not negligible next to c ||G||"
            )
        return lam.new_tensor(ggn.num_params * math.log(float(c)) + logabs)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001, D102
        lam, c, ggn = inputs
        ctx.ggn, ctx.lam, ctx.c = ggn, float(lam), float(c)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: ANN001, ANN205, D102
        d = ctx.lam / ctx.c
        w = ctx.ggn.num_params
        trace = _trace_inverse(ctx.ggn, d)
        g_lam = grad_out * trace / ctx.c
        g_c = grad_out * (w - d * trace) / ctx.c
        return g_lam, g_c, None


if ParametricLaplace is not None:

    class ExactGGNLaplace(ParametricLaplace):
        """laplace-torch's full GGN Laplace with hessinv's exact log-determinant.

        Same constructor as ``laplace.FullLaplace`` (``"regression"`` or
        ``"classification"``; a scalar prior precision). ``fit`` stores the data
        and builds ``hessinv.GaussNewton`` of laplace-torch's loss (``1/2`` MSE
        with ``reduction="sum"``, or cross-entropy with ``reduction="sum"``) on
        all of it; nothing of size ``W x W`` is formed. ``log_marginal_likelihood``,
        ``log_det_ratio`` and ``optimize_prior_precision(method="marglik")`` are
        laplace-torch's, on the exact log-determinant. Predictives and sampling
        are not provided (``NotImplementedError``).
        """

        def _init_H(self) -> None:
            self.H = torch.zeros((), device=self._device, dtype=self._dtype)
            self._data: list[tuple[Tensor, Tensor]] = []
            self.ggn: hessinv.GaussNewton | None = None

        def _loss(self, f: Tensor, y: Tensor) -> Tensor:
            if self.likelihood == "regression":
                return 0.5 * ((f - y) ** 2).sum()  # laplace-torch: MSELoss(sum) times 1/2
            return nn.functional.cross_entropy(f, y, reduction="sum")

        def _curv_closure(self, X: Tensor, y: Tensor, N: int) -> tuple[Tensor, Tensor]:  # noqa: N803
            self._data.append((X, y))
            with torch.no_grad():
                loss = self._loss(self.model(X), y)
            return loss, torch.zeros_like(self.H)

        def fit(self, train_loader, override: bool = True, progress_bar: bool = False) -> None:  # noqa: ANN001
            """Fit on all of ``train_loader`` (``override=False`` is not supported)."""
            if not override:
                raise ValueError("ExactGGNLaplace.fit(override=False) is not supported")
            super().fit(train_loader, override=True, progress_bar=progress_bar)
            X = torch.cat([x for x, _ in self._data])  # noqa: N806
            y = torch.cat([t for _, t in self._data])
            self._data = []
            # the loss is a sum over samples, so one stacked batch is the whole data set's GGN
            self.ggn = hessinv.GaussNewton(self.model, self._loss, X, y, params=self.params)

        @property
        def log_det_posterior_precision(self) -> Tensor:
            """``log det(c G + lam I)``, exact (hessinv), differentiable in ``lam`` and ``c``."""
            if self.ggn is None:
                raise AttributeError("Laplace not fitted. Run fit() first.")
            lam = self.prior_precision
            if lam.numel() != 1:
                raise ValueError(
                    "ExactGGNLaplace needs a scalar prior precision (hessinv's log-determinant "
                    f"takes one damping); got {lam.numel()} values"
                )
            return _ExactLogdet.apply(lam.reshape(()), self._H_factor, self.ggn)


def _fit_map(model: nn.Module, X: Tensor, y: Tensor, sigma: float, lam: float) -> nn.Module:  # noqa: N803
    """The MAP of ``sum (f - y)^2 / (2 sigma^2) + lam/2 |w|^2`` by L-BFGS."""
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        val = ((model(X) - y) ** 2).sum() / (2 * sigma**2)
        val = val + 0.5 * lam * sum(p.pow(2).sum() for p in model.parameters())
        val.backward()
        return val

    opt.step(closure)
    return model


def _mlp(d_in: int, width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1)).double()


def main() -> None:
    """Small net: ExactGGNLaplace against FullLaplace; large net: the exact evidence only."""
    if ParametricLaplace is None:
        print(INSTALL)
        return
    from laplace import Laplace
    from laplace.curvature import BackPackGGN
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    dt = torch.float64
    sigma, lam = 0.1, 1.0
    X = torch.randn(64, 3, dtype=dt)  # noqa: N806
    y = torch.sin(2 * X[:, :1]) * torch.cos(X[:, 1:2]) + 0.1 * torch.randn(64, 1, dtype=dt)
    loader = DataLoader(TensorDataset(X, y), batch_size=16)
    model = _fit_map(_mlp(3, 8, 3), X, y, sigma, lam)

    # laplace-torch's dense full Laplace, on a copy (BackPACK extends the module it is given).
    # Its default backend (curvlinops) forms P from a float32 identity matrix, which limits
    # P to about 1e-8 relative; BackPACK's GGN is float64 throughout.
    full = Laplace(
        copy.deepcopy(model),
        "regression",
        subset_of_weights="all",
        hessian_structure="full",
        sigma_noise=sigma,
        prior_precision=lam,
        backend=BackPackGGN,
    )
    with warnings.catch_warnings():  # BackPACK's hooks on a model whose input needs no grad
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        full.fit(loader)
    exact = ExactGGNLaplace(model, "regression", sigma_noise=sigma, prior_precision=lam)
    exact.fit(loader)
    W = exact.n_params  # noqa: N806

    a, b = float(full.log_det_posterior_precision), float(exact.log_det_posterior_precision)
    ml_full = float(full.log_marginal_likelihood())
    ml_exact = float(exact.log_marginal_likelihood())
    print(f"small net: W = {W}, N = {len(X)}, sigma_noise = {sigma}, prior precision = {lam}")
    print(f"  log det P: laplace-torch FullLaplace {a:.12f}, hessinv {b:.12f}")
    print(f"  log evidence: laplace-torch {ml_full:.12f}, hessinv {ml_exact:.12f}")
    assert abs(a - b) <= 1e-10 * abs(a) and abs(ml_full - ml_exact) <= 1e-10 * abs(ml_full)

    # the gradient in log(lam) and log(sigma): laplace-torch's autograd on the dense P,
    # hessinv's exact traces
    grads = []
    for la in (full, exact):
        log_lam = torch.tensor(math.log(lam), dtype=dt, requires_grad=True)
        log_sig = torch.tensor(math.log(sigma), dtype=dt, requires_grad=True)
        ml = la.log_marginal_likelihood(log_lam.exp(), log_sig.exp())
        grads.append(torch.stack(torch.autograd.grad(ml, (log_lam, log_sig))))
        la.prior_precision, la.sigma_noise = lam, sigma  # drop the graph
    gerr = float((grads[0] - grads[1]).abs().max() / grads[0].abs().max())
    print(f"  d evidence / d(log lam, log sigma): {grads[0].tolist()} vs {grads[1].tolist()}")
    assert gerr <= 1e-9, gerr

    # laplace-torch's own marginal-likelihood optimization of the prior precision, on both
    for la in (full, exact):
        la.optimize_prior_precision(method="marglik", n_steps=30, lr=0.1)
    p_full, p_exact = float(full.prior_precision), float(exact.prior_precision)
    print(f"  optimize_prior_precision(marglik): {p_full:.10f} (dense) vs {p_exact:.10f} (hessinv)")
    assert abs(p_full - p_exact) <= 1e-8 * p_full

    # the exact Hessian, not its Gauss-Newton approximation (laplace-torch's Hessian backends
    # form it densely): here H + lam I is indefinite, so a Laplace evidence with the true
    # Hessian does not exist at this MAP; hessinv's exact inertia says so
    H = hessinv.Hessian(model, lambda f, t: ((f - t) ** 2).sum() / (2 * sigma**2), X, y)  # noqa: N806
    inertia = H.inertia(float(exact.prior_precision))
    print(
        f"  Hessian + lam I (lam = {float(exact.prior_precision):.4f}): inertia {tuple(inertia)} "
        f"(verified: {inertia.verified}); the GGN posterior precision is positive definite"
    )

    # a network whose dense posterior precision laplace-torch cannot store
    torch.manual_seed(1)
    big = _mlp(3, 64, 24)
    Xb = torch.randn(32, 3, dtype=dt)  # noqa: N806
    yb = torch.sin(Xb.sum(1, keepdim=True))
    la = ExactGGNLaplace(big, "regression", sigma_noise=0.1, prior_precision=1.0)
    t0 = time.perf_counter()
    la.fit(DataLoader(TensorDataset(Xb, yb), batch_size=32))
    ml = float(la.log_marginal_likelihood())
    t1 = time.perf_counter()
    Wb = la.n_params  # noqa: N806
    # independent check without W x W: det(lam I_W + c J^T J) = lam^W det(I_N + (c/lam) J J^T)
    # (Sylvester's determinant identity), J = d f / d w by torch.func.jacrev
    params = {k: v.detach() for k, v in big.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(big, p, (Xb,)).reshape(-1))(params)
    J = torch.cat([j.reshape(len(Xb), -1) for j in jac.values()], 1)  # noqa: N806
    c, lam_b = float(la._H_factor), float(la.prior_precision)
    ref = Wb * math.log(lam_b) + float(
        torch.logdet(torch.eye(len(Xb), dtype=dt) + (c / lam_b) * (J @ J.T))
    )
    got = float(la.log_det_posterior_precision)
    print(
        f"large net (at its initial weights): W = {Wb}, depth 24, width 64; dense P would take "
        f"{8 * Wb**2 / 1e9:.0f} GB. Exact log det P = {got:.10f} (N x N identity: {ref:.10f}), "
        f"log evidence = {ml:.6f}, in {t1 - t0:.1f} s"
    )
    assert abs(got - ref) <= 1e-10 * abs(ref)


if __name__ == "__main__":
    main()
