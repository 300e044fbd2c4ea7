"""Optimal Brain Surgeon saliencies and Laplace marginal variances from the exact diag(H^-1).

``H.inverse_diagonal(d)`` is the diagonal of ``(H + dI)^{-1}`` by selected
inversion (linear in depth, never forming the inverse). Two uses:

* Optimal Brain Surgeon (Hassibi & Stork 1993): deleting weight ``i`` and
  re-optimizing the rest raises the loss by ``L_i = w_i^2 / (2 [H^{-1}]_ii)``.
  Optimal Brain Damage (LeCun et al. 1990) approximates it with the diagonal
  of ``H``: ``w_i^2 H_ii / 2``.
* Laplace approximation: with the Gauss-Newton matrix ``G`` and prior precision
  ``lam``, the posterior marginal variances are ``diag((G + lam I)^{-1})``;
  the diagonal Laplace approximation (laplace-torch's ``DiagLaplace``) uses
  ``1 / (diag(G) + lam)``.

Both exact quantities are checked against ``torch.linalg.inv`` of the dense
matrix. (laplace-torch is not a dependency; the diagonal approximation is
computed here from hessinv's exact ``diag(G)``, which is what it estimates.)

Run: ``python examples/obs_saliency.py``.
"""

import torch
from torch import nn

import hessinv

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
X = torch.randn(64, 4, dtype=dt)
y = torch.sin(X.sum(1, keepdim=True))
loss = nn.MSELoss()
opt = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")


def closure():
    opt.zero_grad()
    out = loss(model(X), y)
    out.backward()
    return out


opt.step(closure)  # near a minimum, where OBS's quadratic model applies
w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

# -- Optimal Brain Surgeon ---------------------------------------------------------
H = hessinv.Hessian(model, loss, X, y)
d = 1e-3 * float(H.diagonal().abs().max())  # damped OBS: H itself may be singular
hinv = H.inverse_diagonal(d)
dense_inv = torch.linalg.inv(H.to_dense() + d * torch.eye(H.num_params, dtype=dt))
err = float((hinv - dense_inv.diagonal()).abs().max() / dense_inv.diagonal().abs().max())
obs = w**2 / (2 * hinv)
obd = w**2 * H.diagonal() / 2
k = 20
top_obs = set(torch.argsort(obs)[:k].tolist())
top_obd = set(torch.argsort(obd)[:k].tolist())
print(f"W = {H.num_params}; diag((H + dI)^-1) vs dense inverse: max error {err:.1e}")
print(f"{k} least salient weights: OBS and OBD agree on {len(top_obs & top_obd)} of {k}")
i = int(torch.argmax((obd - obs).abs() / obs.abs().clamp_min(1e-300)))
print(f"largest OBD/OBS disagreement: weight {i}, OBS {float(obs[i]):.2e}, OBD {float(obd[i]):.2e}")
assert err <= 1e-8

# -- Laplace marginal variances -------------------------------------------------------
G = hessinv.GaussNewton(model, loss, X, y)
lam = 1e-2 * float(G.diagonal().max())  # prior precision
var_exact = G.inverse_diagonal(lam)
var_dense = torch.linalg.inv(G.to_dense() + lam * torch.eye(G.num_params, dtype=dt)).diagonal()
var_diag = 1.0 / (G.diagonal() + lam)  # the diagonal Laplace approximation
err = float((var_exact - var_dense).abs().max() / var_dense.abs().max())
ratio = var_diag / var_exact
print(f"Laplace variances vs dense inverse: max error {err:.1e}")
print(
    f"diagonal approximation / exact variance: min {float(ratio.min()):.2g}, median "
    f"{float(ratio.median()):.2g}, max {float(ratio.max()):.2g} (it underestimates: "
    "1/(G_ii + lam) <= [(G + lam I)^-1]_ii for a positive definite matrix)"
)
assert err <= 1e-8 and bool((ratio <= 1 + 1e-10).all())

try:  # the Kronecker-factored and diagonal approximations of laplace-torch, if installed
    import laplace  # noqa: F401
except ImportError:
    print("laplace-torch not installed: its KFAC comparison is skipped")
