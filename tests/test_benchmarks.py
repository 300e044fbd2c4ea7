"""The benchmark scripts run (quick mode, tiny sizes) so that they cannot rot."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scaling_quick(tmp_path):
    pytest.importorskip("matplotlib")
    mod = _load("scaling")
    res = mod.main(
        [
            "--quick",
            "--out",
            str(tmp_path),
            "--minres-seconds",
            "0.5",
            "--depths",
            "4",
            "8",
            "32",
            "64",
        ]
    )
    data = json.loads((tmp_path / "scaling_quick.json").read_text())
    assert len(data["depth_sweep"]) == 5 and len(data["batch_sweep"]) == 3
    for r in data["depth_sweep"]:  # the quick sweep runs the dense solve everywhere
        assert r["residual"] <= 100 * max(r["dense_residual"], 2.2e-16)
    assert all(Path(p).exists() for p in res["plots"])


def test_training_quick(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    mod = _load("training")
    res = mod.main(["--quick", "--out", str(tmp_path), "--budget", "0.1"])
    data = json.loads((tmp_path / "training_quick.json").read_text())
    assert set(data["tasks"]) == {
        "hp-1d",
        "hp-2d",
        "hp-3d",
        "synthetic",
        "synthetic-scaled",
        "digits",
    }
    for task in data["tasks"].values():
        runs = task["runs"]
        assert set(runs) == {"newton-tr", "lm-gn", "adam", "sgd-momentum", "lbfgs"}
        for kind in ("newton-tr", "lm-gn"):
            for r in runs[kind]:  # the loss never increases (only accepted steps move)
                assert all(b <= a for a, b in zip(r["loss"], r["loss"][1:], strict=False))
                assert r["certified"] == r["steps"]  # dense and kernel routes prove every step
        assert set(task["summary"]) == set(runs) and "race" in task
    assert Path(res["plot"]).exists()


def test_riccati_quick(tmp_path):
    mod = _load("riccati")
    res = mod.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "riccati_quick.json").read_text())
    assert len(data["rows"]) == len(res["rows"]) == 2
    for r in data["rows"]:  # PD by the LU's inertia: the certificate must be obtained
        assert r["certified_pd"] and r["inertia_reliable"] and r["inertia_agrees_with_lu"]


def test_spectrum_quick(tmp_path):
    pytest.importorskip("matplotlib")
    mod = _load("spectrum")
    res = mod.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "spectrum_quick.json").read_text())
    for r in data["rows"]:  # every quick net fits the dense reference
        assert r["bins_differing"] == 0
        assert r["eig_err"] <= 1e-8 and r["invdiag_err"] <= 1e-8
        assert sum(r["counts"]) == r["W"]
        if "pyh" in r:  # PyHessian installed: it saw the same loss, and its estimates are recorded
            ph = r["pyh"]
            assert ph["hvp_rel_diff"] <= 1e-12
            assert len(ph["eig_rel_err"]) == 4
            assert abs(sum(ph["density_counts"]) - r["W"]) <= 1e-6 * r["W"]
    assert Path(res["plot"]).exists()
