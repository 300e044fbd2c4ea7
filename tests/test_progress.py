"""progress=: a tqdm bar on stderr for long builds and factorizations (hessinv.progress)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hessinv


def _problem():  # noqa: ANN202
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    model = model.double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    return model, nn.MSELoss(), X, y


@pytest.mark.parametrize("progress", [False, True])
def test_no_output_when_off_or_short(capfd, progress: bool) -> None:  # noqa: ANN001
    """progress=False never prints; the default prints nothing for work under 2 s."""
    model, lf, X, y = _problem()
    H = hessinv.Hessian(model, lf, X, y, progress=progress)
    g = H.gradient()
    H.solve(g, 0.1, method="lifted")
    H.logdet(0.1, method="lifted")
    Hd = hessinv.Hessian(model, lf, data=[(X[:4], y[:4]), (X[4:], y[4:])], progress=progress)
    Hd @ g
    Hd.solve(g, 0.1, method="lifted")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_forced_bar_shows_stage_counts(capfd) -> None:  # noqa: ANN001
    """progress=0: bars at once, with the counts of stages, lifted blocks and batches."""
    model, lf, X, y = _problem()
    H = hessinv.Hessian(model, lf, X, y, progress=0)
    err = capfd.readouterr().err
    assert "hessinv: derivative blocks" in err and "0/3" in err and "stage" in err
    H.solve(H.gradient(), 0.1, method="lifted")
    err = capfd.readouterr().err
    # the solve eliminates the 3 stages (hessinv.riccati_solve) ...
    assert "hessinv: stage Riccati" in err and "/3" in err
    # ... and the pivoted LU of the 2 L - 1 = 5 blocks of K (small neighbours merged,
    # hessinv.lifted_merge) is built when something needs it
    fac = H.factor(0.1, method="lifted")
    fac.logdet()
    err = capfd.readouterr().err
    n_bl = len(fac.merged.sizes)
    assert 1 <= n_bl <= 5
    assert "hessinv: lifted LU" in err and f"/{n_bl}" in err and "block" in err
    Hd = hessinv.Hessian(model, lf, data=[(X[:4], y[:4]), (X[4:], y[4:])], progress=0)
    Hd @ torch.ones(H.num_params, dtype=torch.float64)
    err = capfd.readouterr().err
    assert "hessinv: batches" in err and "0/2" in err


def test_progress_argument_checked() -> None:
    model, lf, X, y = _problem()
    with pytest.raises(ValueError, match="progress"):
        hessinv.Hessian(model, lf, X, y, progress=-1.0)
    with pytest.raises(TypeError, match="progress"):
        hessinv.Hessian(model, lf, X, y, progress="yes")
