"""The ``hessinv demo`` command on a small problem."""

import pytest

from hessinv.cli import main


def test_demo_small(capsys):
    assert main(["demo", "--depth", "6", "--width", "3", "--batch", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    for key in (
        "parameters",
        "H @ v",
        "exact solve",
        "dense solve",
        "residual",
        "inertia",
        "log|det|",
    ):
        assert key in out
    res = [
        float(line.split()[1]) for line in out.splitlines() if line.strip().startswith("residual")
    ]
    assert len(res) == 2 and max(res) < 1e-10


def test_demo_float32_and_singular(capsys):
    assert (
        main(
            [
                "demo",
                "--depth",
                "4",
                "--width",
                "3",
                "--batch",
                "2",
                "--dtype",
                "float32",
                "--quiet",
            ]
        )
        == 0
    )
    # batch 1 and no damping: H is exactly singular, the demo says so and exits non-zero
    assert (
        main(
            [
                "demo",
                "--depth",
                "3",
                "--width",
                "4",
                "--batch",
                "1",
                "--damping",
                "0",
                "--quiet",
                "--no-dense",
            ]
        )
        == 2
    )
    assert "damping" in capsys.readouterr().err


def test_bad_arguments():
    with pytest.raises(SystemExit):
        main(["demo", "--depth", "0"])


def test_version_and_repr(capsys):
    import pytest
    import torch
    from torch import nn

    import hessinv
    from hessinv.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"hessinv {hessinv.__version__}"
    m = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    X, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    r = repr(hessinv.Hessian(m, nn.MSELoss(), X, y))
    assert r == "Hessian(W=13, stages=2, batch=4, dtype=torch.float64, device=cpu)"
