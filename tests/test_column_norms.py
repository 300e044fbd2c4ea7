"""``column_norms``: the plain norm where it is safe, the scaled one elsewhere (same values).

The reference is independent: each column scaled by a power of two (exact),
its squares summed exactly rounded (``math.fsum``), scaled back.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hessinv.solvers.estimates import column_norms


def _reference(t: torch.Tensor) -> list[float]:
    out = []
    for col in t.double().T.tolist():
        if any(math.isnan(x) for x in col):
            out.append(math.nan)
            continue
        if any(math.isinf(x) for x in col):
            out.append(math.inf)
            continue
        big = max((abs(x) for x in col), default=0.0)
        if big == 0.0:
            out.append(0.0)
            continue
        e = math.frexp(big)[1]
        out.append(math.ldexp(math.sqrt(math.fsum((math.ldexp(x, -e)) ** 2 for x in col)), e))
    return out


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 400),
    cols=st.integers(1, 4),
    exps=st.lists(st.integers(-320, 300), min_size=4, max_size=4),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_column_norms_match_an_exactly_summed_reference(rows, cols, exps, dtype) -> None:  # noqa: ANN001
    gen = torch.Generator().manual_seed(rows * 7 + cols)
    t = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    info = torch.finfo(dtype)
    lo, hi = math.log10(info.tiny) - 6, math.log10(info.max) - 3  # into subnormals, no inf
    for j in range(cols):
        t[:, j] *= 10.0 ** max(min(exps[j], hi), lo)
    t = t.to(dtype)
    got = column_norms(t).double().tolist()
    want = _reference(t)
    eps = info.eps
    for g, w in zip(got, want, strict=True):
        if w == 0.0 or not math.isfinite(w):
            assert g == w or (math.isnan(g) and math.isnan(w))
        else:  # a few ulps per entry, and the output's own rounding (a subnormal's spacing)
            assert abs(g - w) <= 4 * math.sqrt(rows) * eps * w + 2 * info.tiny * eps


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_columns(bad: float) -> None:
    t = torch.randn(50, 3, dtype=torch.float64)
    t[7, 1] = bad
    n = column_norms(t)
    assert math.isfinite(n[0]) and math.isfinite(n[2])
    assert not math.isfinite(n[1])  # NaN (or inf): never a finite number


def test_zero_and_empty() -> None:
    assert column_norms(torch.zeros(5, 2)).tolist() == [0.0, 0.0]
    assert column_norms(torch.zeros(0, 3)).tolist() == [0.0, 0.0, 0.0]
