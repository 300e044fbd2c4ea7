"""Optimal Brain Surgeon saliencies and Laplace marginal variances from the exact diag(H^-1).

``H.inverse_diagonal(d)`` is the diagonal of ``(H + dI)^{-1}`` by selected
inversion (linear in depth, never forming the inverse). Two uses:

* Optimal Brain Surgeon (Hassibi & Stork 1993): deleting weight ``i`` and
  re-optimizing the rest raises the loss by ``L_i = w_i^2 / (2 [H^{-1}]_ii)``.
  Optimal Brain Damage (LeCun et al. 1990) approximates it with the diagonal
  of ``H``: ``w_i^2 H_ii / 2``.
* Laplace approximation: with the Gauss-Newton matrix ``G`` of the negative
  log-likelihood ``sum (f - y)^2 / (2 sigma^2)`` and the prior precision
  ``lam``, the posterior marginal variances are ``diag((G + lam I)^{-1})``.

Both exact quantities are checked against ``torch.linalg.inv`` of the dense
matrix. Then, if laplace-torch is installed (optional: see INSTALL below), the
same network goes through laplace-torch's ``Laplace(model, "regression",
subset_of_weights="all", hessian_structure=...)`` with the same
``sigma_noise`` and ``prior_precision``:

* ``"full"`` must reproduce hessinv's ``G + lam I`` (checked to 1e-12 with
  the BackPACK backend; the default curvlinops backend forms it from a
  float32 identity and agrees only to about 1e-8);
* ``"diag"`` must equal ``diag(G) + lam`` exactly (its variances
  ``1 / (G_ii + lam)`` ignore every correlation);
* ``"kron"`` (K-FAC): its variances, from the Kronecker-factored precision,
  and the pruning orders derived from each.

Run: ``python examples/obs_saliency.py [--plot FILE.png]``.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from torch import Tensor, nn

import hessinv

INSTALL = (
    "laplace-torch not installed: its diag/kron comparison is skipped. Install it without "
    "its dependencies (its torchvision pin would replace torch): pip install --no-deps "
    "laplace-torch==0.3 asdfghjkl==0.1a4 curvlinops-for-pytorch==3.0.1 "
    "backpack-for-pytorch==1.7.1 torchmetrics lightning-utilities einops einconv linear_operator "
    "unfoldNd opt_einsum"
)


def ranks(x: Tensor) -> Tensor:
    """The rank of each entry (0 = smallest; no ties in continuous data)."""
    r = torch.empty_like(x)
    r[torch.argsort(x)] = torch.arange(len(x), dtype=x.dtype)
    return r


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def overlap(a: Tensor, b: Tensor, k: int) -> int:
    """How many of the ``k`` smallest entries of ``a`` are among the ``k`` smallest of ``b``."""
    return len(set(torch.argsort(a)[:k].tolist()) & set(torch.argsort(b)[:k].tolist()))


def main(plot: str | None = None) -> None:
    """OBS and OBD, exact Laplace variances, and laplace-torch's approximations."""
    torch.manual_seed(0)
    dt = torch.float64
    model = nn.Sequential(
        nn.Linear(4, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 1),
    ).to(dt)
    X = torch.randn(48, 4, dtype=dt)  # noqa: N806
    y = torch.sin(X.sum(1, keepdim=True))
    loss = nn.MSELoss()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        out = loss(model(X), y)
        out.backward()
        return out

    opt.step(closure)  # near a minimum, where OBS's quadratic model applies
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    # -- Optimal Brain Surgeon ---------------------------------------------------------
    H = hessinv.Hessian(model, loss, X, y)  # noqa: N806
    d = 1e-3 * float(H.diagonal().abs().max())  # damped OBS: H itself may be singular
    hinv = H.inverse_diagonal(d)
    dense_inv = torch.linalg.inv(H.to_dense() + d * torch.eye(H.num_params, dtype=dt))
    err = float((hinv - dense_inv.diagonal()).abs().max() / dense_inv.diagonal().abs().max())
    obs = w**2 / (2 * hinv)
    obd = w**2 * H.diagonal() / 2
    k = 20
    print(f"W = {H.num_params}; diag((H + dI)^-1) vs dense inverse: max error {err:.1e}")
    print(
        f"{k} least salient weights: OBS and OBD agree on {overlap(obs, obd, k)} of {k}; "
        f"Spearman rank correlation {spearman(obs, obd):.3f}"
    )
    i = int(torch.argmax((obd - obs).abs() / obs.abs().clamp_min(1e-300)))
    print(f"largest OBD/OBS disagreement: weight {i}, OBS {obs[i]:.2e}, OBD {obd[i]:.2e}")
    assert err <= 1e-8

    # -- Laplace marginal variances -------------------------------------------------------
    sigma, lam = 0.1, 1.0  # observation noise and prior precision (laplace-torch's names)
    G = hessinv.GaussNewton(model, lambda f, t: ((f - t) ** 2).sum() / (2 * sigma**2), X, y)  # noqa: N806
    var_exact = G.inverse_diagonal(lam)
    P = G.to_dense() + lam * torch.eye(G.num_params, dtype=dt)  # noqa: N806
    var_dense = torch.linalg.inv(P).diagonal()
    err = float((var_exact - var_dense).abs().max() / var_dense.abs().max())
    print(f"Laplace variances diag((G + lam I)^-1) vs dense inverse: max error {err:.1e}")
    assert err <= 1e-8

    try:  # laplace-torch's diagonal and Kronecker-factored approximations, if installed
        from laplace import Laplace
        from laplace.curvature import BackPackGGN
    except ImportError:
        print(INSTALL)
        return
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(X, y), batch_size=16)

    def fit(structure: str, net: nn.Module = model, **kw):  # noqa: ANN003, ANN202
        la = Laplace(net, "regression", subset_of_weights="all", hessian_structure=structure,
                     sigma_noise=sigma, prior_precision=lam, **kw)  # fmt: skip
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            la.fit(loader)
        return la

    # the same posterior precision: "full" (BackPACK works on a copy: it extends the module)
    full = fit("full", copy.deepcopy(model), backend=BackPackGGN).posterior_precision
    full_default = fit("full").posterior_precision  # curvlinops backend, float32 identity
    e_full = float((full - P).abs().max() / P.abs().max())
    e_default = float((full_default - P).abs().max() / P.abs().max())
    diag_la = fit("diag")
    e_diag = float((diag_la.posterior_precision - P.diagonal()).abs().max() / P.abs().max())
    print(
        f"laplace-torch's precision vs hessinv's G + lam I: full {e_full:.0e} (default "
        f"backend {e_default:.0e}), diag {e_diag:.0e}"
    )
    assert e_full <= 1e-12 and e_diag <= 1e-12
    kron_la = fit("kron")
    variances = {
        "diag": diag_la.posterior_variance,
        "kron": kron_la.posterior_precision.diag(exponent=-1),
    }
    sal_exact = w**2 / (2 * var_exact)  # OBS on the posterior precision
    print("marginal variances (approx / exact) and OBS pruning order (w^2 / 2 var) vs exact:")
    print("  approx | median ratio | min ratio | max ratio | Spearman | 20 least salient shared")
    for name, var in variances.items():
        ratio = var / var_exact
        sal = w**2 / (2 * var)
        print(
            f"  {name:6s} | {float(ratio.median()):12.3g} | {float(ratio.min()):9.3g} | "
            f"{float(ratio.max()):9.3g} | {spearman(sal, sal_exact):8.3f} | "
            f"{overlap(sal, sal_exact, k):2d} of {k}"
        )
    assert bool((variances["diag"] <= var_exact * (1 + 1e-10)).all())  # diag underestimates

    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.8, 4.2))
        lo, hi = float(var_exact.min()), float(var_exact.max())
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="exact")
        for (name, var), mk in zip(variances.items(), ("o", "x"), strict=True):
            ax.loglog(var_exact, var, mk, ms=3.5, alpha=0.7, label=f"laplace-torch {name}")
        ax.set_xlabel("exact marginal variance  diag((G + lam I)^-1)  (hessinv)")
        ax.set_ylabel("approximate marginal variance")
        ax.set_title(f"Laplace marginal variances, W = {G.num_params}", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot, dpi=90)
        print(f"wrote {plot}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="OBS saliencies and Laplace variances", allow_abbrev=False
    )
    parser.add_argument("--plot", default=None, help="write a PNG of the variances (default: none)")
    main(parser.parse_known_args()[0].plot)  # known args only: the tests run it under pytest
