"""laplace-torch (optional) on the same networks as hessinv: the same posterior precision.

References are independent: laplace-torch's own dense matrices (BackPACK backend,
float64 throughout) and a dense ``P = J^T J / sigma^2 + lam I`` from
``torch.func.jacrev`` of the network, with ``torch.linalg.slogdet`` / ``inv``.
"""

import copy
import math
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import hessinv

laplace = pytest.importorskip("laplace")
from laplace import Laplace  # noqa: E402
from laplace.curvature import BackPackGGN  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "laplace_torch_evidence.py"
DT = torch.float64


def net_and_data(seed=0, n=24, classes=None):
    torch.manual_seed(seed)
    out = classes or 1
    model = nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, out)
    ).to(DT)
    X = torch.randn(n, 3, dtype=DT)
    if classes:
        y = torch.randint(0, classes, (n,))
    else:
        y = torch.sin(X.sum(1, keepdim=True))
    return model, X, y


def jacobian(model, X):
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (X,)))(params)
    n, o = model(X).shape
    return torch.cat([j.reshape(n * o, -1) for j in jac.values()], 1), model(X).detach()


def dense_posterior_precision(model, X, sigma, lam):
    """``J^T J / sigma^2 + lam I``: the GGN of ``sum (f - y)^2 / (2 sigma^2)`` plus the prior."""
    J, _ = jacobian(model, X)
    return J.T @ J / sigma**2 + lam * torch.eye(J.shape[1], dtype=DT)


def fit(model, X, y, structure, likelihood="regression", **kw):
    la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        la.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    return la


def ggn(model, X, y, sigma):
    return hessinv.GaussNewton(model, lambda f, t: ((f - t) ** 2).sum() / (2 * sigma**2), X, y)


def test_full_laplace_is_hessinv_ggn_plus_prior():
    model, X, y = net_and_data()
    sigma, lam = 0.3, 2.0
    P_ref = dense_posterior_precision(model, X, sigma, lam)
    la = fit(copy.deepcopy(model), X, y, "full", sigma_noise=sigma, prior_precision=lam,
             backend=BackPackGGN)  # fmt: skip
    G = ggn(model, X, y, sigma)
    W = G.num_params
    P = G.to_dense() + lam * torch.eye(W, dtype=DT)
    norm = float(P_ref.abs().max())
    assert float((la.posterior_precision - P_ref).abs().max()) <= 1e-13 * norm
    assert float((P - P_ref).abs().max()) <= 1e-13 * norm
    ref = float(torch.linalg.slogdet(P_ref)[1])
    sign, ld = G.logdet(lam)
    assert sign == 1.0
    # slogdet's own error is ~ W eps cond(P) relative to |logdet| at worst
    assert abs(ld - ref) <= 1e-10 * abs(ref)
    assert abs(float(la.log_det_posterior_precision) - ref) <= 1e-10 * abs(ref)


def test_diag_laplace_is_exact_diag_and_underestimates_the_exact_variances():
    model, X, y = net_and_data(seed=1)
    sigma, lam = 0.5, 0.7
    P_ref = dense_posterior_precision(model, X, sigma, lam)
    la = fit(model, X, y, "diag", sigma_noise=sigma, prior_precision=lam)
    G = ggn(model, X, y, sigma)
    assert torch.allclose(la.posterior_precision, P_ref.diagonal(), rtol=1e-13, atol=0)
    assert torch.allclose(G.diagonal() + lam, P_ref.diagonal(), rtol=1e-13, atol=0)
    var_ref = torch.linalg.inv(P_ref).diagonal()
    var = G.inverse_diagonal(lam)
    assert torch.allclose(var, var_ref, rtol=1e-9, atol=0)
    # 1 / P_ii <= [P^-1]_ii for P positive definite (Cauchy-Schwarz): the diagonal
    # approximation can only underestimate, and does here by more than round-off
    assert bool((la.posterior_variance <= var * (1 + 1e-12)).all())
    assert float((la.posterior_variance / var).min()) < 0.5


def test_kron_laplace_variances_are_kfac_not_exact():
    """K-FAC's variances come from its own precision: they differ from the exact ones."""
    model, X, y = net_and_data(seed=2)
    sigma, lam = 0.5, 1.0
    la = fit(model, X, y, "kron", sigma_noise=sigma, prior_precision=lam)
    var_kron = la.posterior_precision.diag(exponent=-1)
    var = ggn(model, X, y, sigma).inverse_diagonal(lam)
    var_ref = torch.linalg.inv(dense_posterior_precision(model, X, sigma, lam)).diagonal()
    assert torch.allclose(var, var_ref, rtol=1e-9, atol=0)
    assert var_kron.shape == var.shape
    assert float(((var_kron - var) / var).abs().max()) > 1e-2


@pytest.fixture(scope="module")
def example():
    return runpy.run_path(str(EXAMPLE), run_name="laplace_torch_evidence")


@pytest.mark.parametrize("sigma", [1e-6, 0.2, 1e6])  # c = 1/sigma^2 from 1e12 to 1e-12
def test_exact_ggn_laplace_evidence_and_gradient(example, sigma):
    model, X, y = net_and_data(seed=3)
    lam = 0.5 / sigma**2  # the prior scales with the likelihood: the same conditioning
    P_ref = dense_posterior_precision(model, X, sigma, lam)
    ref = float(torch.linalg.slogdet(P_ref)[1])
    exact = example["ExactGGNLaplace"](model, "regression", sigma_noise=sigma,
                                       prior_precision=lam)  # fmt: skip
    exact.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    assert abs(float(exact.log_det_posterior_precision) - ref) <= 1e-10 * max(abs(ref), 1.0)
    full = fit(copy.deepcopy(model), X, y, "full", sigma_noise=sigma, prior_precision=lam,
               backend=BackPackGGN)  # fmt: skip
    a, b = float(full.log_marginal_likelihood()), float(exact.log_marginal_likelihood())
    assert abs(a - b) <= 1e-10 * abs(a)
    # laplace-torch's autograd through its dense P against hessinv's exact traces
    grads = []
    for la in (full, exact):
        log_lam = torch.tensor(math.log(lam), dtype=DT, requires_grad=True)
        log_sig = torch.tensor(math.log(sigma), dtype=DT, requires_grad=True)
        ml = la.log_marginal_likelihood(log_lam.exp(), log_sig.exp())
        grads.append(torch.stack(torch.autograd.grad(ml, (log_lam, log_sig))))
    assert torch.allclose(grads[0], grads[1], rtol=1e-9, atol=0)
    # the log-determinant's gradient alone, against torch.func.grad of slogdet(P_ref)
    J, _ = jacobian(model, X)

    def logdet(log_lam, log_sig):
        P = J.T @ J / log_sig.exp() ** 2 + log_lam.exp() * torch.eye(J.shape[1], dtype=DT)
        return torch.linalg.slogdet(P)[1]

    at = (torch.tensor(math.log(lam), dtype=DT), torch.tensor(math.log(sigma), dtype=DT))
    d_ref = torch.stack(torch.func.grad(logdet, argnums=(0, 1))(*at))
    log_lam, log_sig = (t.clone().requires_grad_() for t in at)
    exact.prior_precision, exact.sigma_noise = log_lam.exp(), log_sig.exp()
    d = torch.stack(torch.autograd.grad(exact.log_det_posterior_precision, (log_lam, log_sig)))
    assert torch.allclose(d, d_ref, rtol=1e-9, atol=1e-12 * float(d_ref.abs().max()))


def test_exact_ggn_laplace_classification(example):
    model, X, y = net_and_data(seed=4, classes=3)
    full = fit(copy.deepcopy(model), X, y, "full", likelihood="classification",
               prior_precision=0.3, backend=BackPackGGN)  # fmt: skip
    exact = example["ExactGGNLaplace"](model, "classification", prior_precision=0.3)
    exact.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    a, b = float(full.log_det_posterior_precision), float(exact.log_det_posterior_precision)
    assert abs(a - b) <= 1e-10 * abs(a)
    a, b = float(full.log_marginal_likelihood()), float(exact.log_marginal_likelihood())
    assert abs(a - b) <= 1e-10 * abs(a)


def test_exact_ggn_laplace_refuses_a_layerwise_prior(example):
    model, X, y = net_and_data(seed=5)
    exact = example["ExactGGNLaplace"](model, "regression", prior_precision=1.0)
    exact.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    exact.prior_precision = torch.linspace(1, 2, exact.n_layers, dtype=DT)
    with pytest.raises(ValueError, match="scalar prior precision"):
        _ = exact.log_det_posterior_precision


@pytest.mark.parametrize("name", ["laplace_torch_evidence.py", "obs_saliency.py"])
def test_example_without_laplace_prints_the_recipe(monkeypatch, capsys, name):
    for mod in [m for m in sys.modules if m == "laplace" or m.startswith("laplace.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "laplace", None)  # import laplace -> ImportError
    runpy.run_path(str(EXAMPLE.parent / name), run_name="__main__")
    out = capsys.readouterr().out
    assert "pip install --no-deps laplace-torch" in out and "laplace-torch's" not in out


def test_exact_ggn_laplace_refuses_a_singular_posterior_precision(example):
    model, X, y = net_and_data(seed=6, n=4)  # 4 samples, W = 49: G has rank <= 4
    exact = example["ExactGGNLaplace"](model, "regression", prior_precision=0.0)
    exact.fit(DataLoader(TensorDataset(X, y), batch_size=4))
    with pytest.raises(ValueError, match="not positive definite"):
        _ = exact.log_det_posterior_precision
