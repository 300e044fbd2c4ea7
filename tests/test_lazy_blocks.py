"""Lazy dense blocks of the batched ``Linear -> activation`` runs (``LazyBlock``).

A run's ``Jx``, ``Jf_x`` (``x_span``), ``Tzx`` and ``Txx`` are formed only when
read; the default solve, inertia and log-determinant read them through their
factors, shapes and ``max |.|`` only. Checked here:

* formed on read, they equal the per-stage chain-rule blocks (the build
  without runs), entry for entry;
* the ``max |Tzx|`` computed from the factors is the dense block's, bit for
  bit (it sets the equilibration's power of two), over random shapes, ties of
  ``|z|``, zeros, one input coordinate and extreme scales (hypothesis);
* the default calls leave every lazy block unformed.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_linear_runs import CASES, net

import hessinv
import hessinv.derivatives.linear_runs as lr
from hessinv.derivatives.blocks import LazyBlock
from hessinv.products import compute_blocks

DT = torch.float64
EPS = torch.finfo(DT).eps
LAZY = ("Jx", "Tzx", "Txx", "x_span")


def _lazy_names(b) -> list[str]:  # noqa: ANN001
    return [n for n in LAZY if isinstance(b.__dict__[n], LazyBlock)]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-bias{c[2]}-n{c[3]}" for c in CASES])
def test_lazy_blocks_equal_the_chain_rule_blocks(case, monkeypatch) -> None:  # noqa: ANN001
    widths, tail, bias, batch = case
    model, loss, X, y = net(widths, tail, bias, batch)
    pipe = hessinv.Hessian(model, loss, X, y).pipeline
    _, fast = compute_blocks(pipe)
    monkeypatch.setattr(lr, "MIN_RUN", 10**9)  # no runs: every stage through chain.py
    _, ref = compute_blocks(pipe)
    n_lazy = 0
    for l, (f, g) in enumerate(zip(fast, ref, strict=True)):  # noqa: E741
        names = _lazy_names(f)
        n_lazy += len(names)
        for name in names:
            assert f.shape_of(name) == g.shape_of(name), (l, name)
            want = getattr(g, name)
            got = getattr(f, name)  # formed here
            assert f.formed(name)
            scale = max(float(want.abs().max()), 1e-300)
            assert float((got - want).abs().max()) <= 8 * EPS * scale, (l, name)
    assert n_lazy >= 6  # the lazy forms were exercised (a run of two stages at least)


def _absmax_case(n: int, a_in: int, a: int, bias: bool, tg: bool, ties: int, scale: float):  # noqa: ANN202
    gen = torch.Generator().manual_seed(n * 1000 + a_in * 100 + a * 10 + ties)
    z = torch.randn(1, n, a_in, generator=gen, dtype=DT)
    if ties and a_in > 1:  # equal largest |z| at two coordinates (signs differ), or all zero
        z[0, :, 1] = -z[0, :, 0].abs().max().expand(n) if ties == 1 else 0.0
        z[0, :, 0] = z[0, :, 0].abs().max() if ties == 1 else 0.0
    w = torch.randn(1, a, a_in, generator=gen, dtype=DT)
    b_y = torch.randn(1, n, a, generator=gen, dtype=DT) * scale
    wtg = None
    if tg:
        t = torch.randn(1, n, a, generator=gen, dtype=DT) * scale
        wtg = w.mT.unsqueeze(1) * t.unsqueeze(2)
    return z, wtg, b_y


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 4),
    a_in=st.integers(1, 5),
    a=st.integers(1, 5),
    bias=st.booleans(),
    tg=st.booleans(),
    ties=st.integers(0, 2),
    scale=st.sampled_from([1.0, 1e-150, 1e150, 1e-300]),
)
def test_tzx_absmax_from_the_factors_is_the_dense_one(n, a_in, a, bias, tg, ties, scale) -> None:  # noqa: ANN001
    z, wtg, b_y = _absmax_case(n, a_in, a, bias, tg, ties, scale)
    p = a * a_in + (a if bias else 0)
    got = lr._tzx_absmax(z, wtg, b_y, bias)[0]
    dense = lr._tzx(z[0], None if wtg is None else wtg[0], b_y[0], p, bias)
    assert float(got) == float(dense.abs().amax())  # bit for bit


def test_gram_absmax_is_the_formed_txx_max() -> None:
    model, loss, X, y = net([4, 5, 5, 5, 5], "tanh", True, 3)
    blocks = hessinv.Hessian(model, loss, X, y).blocks
    checked = 0
    for b in blocks:
        if isinstance(b.__dict__["Txx"], LazyBlock):
            m = float(b.absmax("Txx"))
            assert abs(m - float(b.Txx.abs().amax())) <= 4 * EPS * m  # formed here
            checked += 1
    assert checked >= 2


def test_default_calls_form_no_dense_block() -> None:
    model, loss, X, y = net([6, 6, 6, 6, 6, 6], "tanh", True, 2)
    H = hessinv.Hessian(model, loss, X, y)
    lazy = [(b, _lazy_names(b)) for b in H.blocks]
    assert sum(len(n) for _, n in lazy) >= 12
    g = H.gradient()
    fac = H.factor(1e-3)
    fac.solve(g)
    fac.inertia()
    fac.logdet()
    H @ torch.randn(H.num_params, 2, dtype=DT)
    for b, names in lazy:
        assert all(not b.formed(n) for n in names), [n for n in names if b.formed(n)]


def test_shape_queries_do_not_form() -> None:
    model, loss, X, y = net([5, 5, 5, 5, 5], "tanh", False, 3)
    b = next(b for b in hessinv.Hessian(model, loss, X, y).blocks if "Jx" in _lazy_names(b))
    assert b.has("Jx") and b.has("Tzx") and b.rows("Jx") == 15 and b.rows("Tzx") == 15
    assert b.shape_of("x_span") == (3, 5, 25) and not b.first and not b.last
    assert not any(b.formed(n) for n in ("Jx", "Tzx", "x_span"))
    assert b.absmax("Tzx") is not None and not b.formed("Tzx")
