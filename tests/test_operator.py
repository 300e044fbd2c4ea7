"""The operator base class (hessinv.operator): forms, algebra, adjoints, SciPy, errors.

References are dense float64 matrices from ``torch.func.hessian`` of the loss
as a function of the flat parameters (``cases.reference_loss_fn``) and, for the
Gauss-Newton matrix, ``J^T Lambda J`` from ``torch.func.jacrev``/``hessian`` of
the model output and the loss; none uses hessinv. Products are compared at
``100 eps`` relative to the reference's norm (the products themselves are
backward stable; the reference has round-off of the same order).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from cases import DT, reference_loss_fn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import hessinv
from hessinv import IdentityOperator, LinearOperator

EPS = torch.finfo(DT).eps
TOL = 100 * EPS


def _model(seed: int = 0, widths=(3, 4, 2)) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(widths[0], widths[1]), nn.Tanh(), nn.Linear(*widths[1:])).to(DT)


def _data(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)


def _ggn_reference(model: nn.Module, X, y, c: float = 1.0) -> torch.Tensor:
    """``J^T Lambda J`` for the loss ``c * sum (out - y)^2`` (independent of hessinv)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def out(flat):
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = s.numel()
            ps[n] = flat[i : i + k].reshape(s)
            i += k
        return torch.func.functional_call(model, ps, (X,)).reshape(-1)

    J = torch.func.jacrev(out)(x0)
    lam = torch.func.hessian(lambda o: c * ((o - y.reshape(-1)) ** 2).sum())(out(x0).detach())
    return J.T @ lam @ J


@functools.cache
def problem(c: float = 1.0):
    """``(H, G, Href, Gref)`` for ``c`` times a sum of squares."""
    model = _model()
    X, y = _data()

    def loss(o, t):
        return c * ((o - t) ** 2).sum()

    f, x0 = reference_loss_fn(model, loss, X, y)
    href = torch.func.hessian(f)(x0)
    return (
        hessinv.Hessian(model, loss, X, y),
        hessinv.GaussNewton(model, loss, X, y),
        href,
        _ggn_reference(model, X, y, c),
    )


def close(a, b, scale=None) -> bool:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    s = float(torch.linalg.norm(b)) if scale is None else scale
    return float(torch.linalg.norm(a - b)) <= TOL * max(s, 1e-300)


def _vec(w: int, k: int | None, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(w, generator=g, dtype=DT)
        if k is None
        else torch.randn(w, k, generator=g, dtype=DT)
    )


def _split(H, v: torch.Tensor) -> list[torch.Tensor]:
    """``v`` ``(W,)`` or ``(W, k)`` as per-parameter tensors (test-local)."""
    out, i = [], 0
    for p in H.layout.shapes:
        n = int(np.prod(p)) if len(p) else 1
        out.append(v[i : i + n].reshape(*p, *v.shape[1:]))
        i += n
    return out


# -- forms ------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [None, 1, 3])
def test_forms_left_and_right(k):
    H, _, href, _ = problem()
    v = _vec(H.shape[0], k)
    ref = href @ v
    assert close(H @ v, ref)
    lst = H @ _split(H, v)
    assert isinstance(lst, list)
    assert all(a.shape == b.shape for a, b in zip(lst, _split(H, ref), strict=True))
    assert close(
        torch.cat([t.reshape(-1) for t in lst]),
        ref.reshape(-1)
        if k is None
        else torch.cat([t.reshape(-1, k) for t in _split(H, ref)]).reshape(-1),
    )
    out_np = H @ v.numpy()
    assert isinstance(out_np, np.ndarray) and out_np.shape == tuple(ref.shape)
    assert close(torch.from_numpy(out_np), ref)
    out_nl = H @ [t.numpy() for t in _split(H, v)]
    assert all(isinstance(t, np.ndarray) for t in out_nl)
    # from the left: v^T H, and (k, W) @ H
    left = v if k is None else v.T
    assert close(left @ H, left @ href)
    assert close(torch.from_numpy(left.numpy() @ H), left @ href)


def test_list_matrix_form_columns():
    """``[(*p.shape, k)]``: column ``j`` of every tensor is the product with column ``j``."""
    H, _, href, _ = problem()
    v = _vec(H.shape[0], 4)
    out = H @ _split(H, v)
    assert [tuple(t.shape) for t in out] == [(*s, 4) for s in H.pipeline.param_shapes]
    for j in range(4):
        ref = _split(H, href @ v[:, j])
        assert all(close(a[..., j], b) for a, b in zip(out, ref, strict=True))


# -- algebra ----------------------------------------------------------------------------
@pytest.mark.parametrize("c", [1e-12, 1.0, 1e12])
@pytest.mark.parametrize("d", [1e-3, -0.7, 0.0])
def test_shift_is_exact_and_scales(c, d):
    """``(H + d I) @ v`` for the loss ``c l`` at shift ``c d``: ``c`` times the answer at 1."""
    H, _, href, _ = problem(c)
    W = H.shape[0]
    v = _vec(W, 2)
    eye = torch.eye(W, dtype=DT)
    for A in (H + c * d * H.identity(), H + c * d * IdentityOperator(W), c * d * H.identity() + H):
        ref = (href + c * d * eye) @ v
        assert close(A @ v, ref)
        assert close(A.to_dense(), href + c * d * eye)
        assert A.symmetric and A.T is A


def test_scalars_negation_difference():
    H, G, href, gref = problem()
    v = _vec(H.shape[0], 3)
    cases = {
        "0.5*H": (0.5 * H, 0.5 * href),
        "H*3": (H * 3, 3 * href),
        "H/4": (H / 4, href / 4),
        "-H": (-H, -href),
        "H-G": (H - G, href - gref),
        "np*H": (np.float64(2.5) * H, 2.5 * href),
        "t*H": (torch.tensor(-1.5, dtype=DT) * H, -1.5 * href),
        "+H": (+H, href),
        "2(H-G)+G": (2 * (H - G) + G, 2 * href - gref),
    }
    for name, (A, ref) in cases.items():
        assert close(A @ v, ref @ v), name
        assert close(A.to_dense(), ref), name
        assert A.shape == (H.shape[0], H.shape[0]) and A.dtype == DT, name


def test_composition_and_adjoint_of_a_nonsymmetric_product():
    H, G, href, gref = problem()
    W = H.shape[0]
    v = _vec(W, 3)
    P = H @ G  # not symmetric
    pref = href @ gref
    assert not P.symmetric
    assert close(P @ v, pref @ v)
    assert close(P.T @ v, pref.T @ v)
    assert close(v.T @ P, v.T @ pref)
    assert close(P.T.to_dense(), pref.T)
    assert P.T.T is P
    S = P + G - 2 * P.T  # a sum of nonsymmetric terms
    sref = pref + gref - 2 * pref.T
    assert close(S @ v, sref @ v) and close(S.T @ v, sref.T @ v)
    assert close(S.adjoint().to_dense(), sref.T)
    sp = S.to_scipy()
    x = v[:, 0].numpy()
    assert close(torch.from_numpy(sp.matvec(x)), sref @ v[:, 0])
    assert close(torch.from_numpy(sp.rmatvec(x)), sref.T @ v[:, 0])
    assert close(torch.from_numpy(sp.matmat(v.numpy())), sref @ v)
    sp32 = S.to_scipy(dtype=np.float32)
    assert sp32.dtype == np.float32 and (sp32 @ x).dtype == np.float32
    assert np.allclose(
        sp32 @ x, (sref @ v[:, 0]).numpy(), rtol=1e-5, atol=1e-5 * float(sref.norm())
    )


def test_inverse_operator_factorization_and_composition():
    H, _, href, _ = problem()
    W = H.shape[0]
    d = 0.3
    v = _vec(W, 2)
    aref = href + d * torch.eye(W, dtype=DT)
    xref = torch.linalg.solve(aref, v)
    inv = H.inverse(d)
    fac = H.factor(d)
    for op in (inv, fac):
        assert isinstance(op, LinearOperator) and op.symmetric
        assert op.shape == (W, W) and op.dtype == DT
        assert close(op @ v, xref, scale=float(xref.norm()) * 10)
        assert close(v.T @ op, xref.T, scale=float(xref.norm()) * 10)
        assert close(
            op.to_dense(), torch.linalg.inv(aref), scale=float(torch.linalg.inv(aref).norm()) * 10
        )
    sol = H.solve(_split(H, v), d)  # the [(*p.shape, k)] form through solve too
    assert all(
        close(a, b, scale=float(xref.norm()) * 10)
        for a, b in zip(sol, _split(H, xref), strict=True)
    )
    # (H + dI) (H + dI)^{-1} = I, as a composed operator
    E = (H + d * H.identity()) @ inv
    assert close(E @ v, v, scale=float(v.norm()) * 10)
    assert close(torch.from_numpy(inv.to_scipy() @ v.numpy()), xref, scale=float(xref.norm()) * 10)


def test_gaussnewton_is_an_operator_too():
    _, G, _, gref = problem()
    v = _vec(G.shape[0], 2)
    assert isinstance(G, LinearOperator) and G.T is G
    assert close(G @ v, gref @ v) and close(v.T @ G, v.T @ gref)
    assert close((G + 0.1 * G.identity()).to_dense(), gref + 0.1 * torch.eye(G.shape[0], dtype=DT))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_expressions(data):
    """Random expression trees over H, G, I against the same expression of dense matrices.

    The error is measured against ``b ||v||``, ``b`` the bound on ``||A||`` that the tree
    gives (``|c| b``, ``b1 + b2``, ``b1 b2``), the scale of the round-off of any evaluation
    order (a difference may cancel to exactly zero in one order and not in another).
    """
    H, G, href, gref = problem()
    W = H.shape[0]
    eye = torch.eye(W, dtype=DT)
    n2 = functools.partial(torch.linalg.matrix_norm, ord=2)
    leaves = [(H, href, float(n2(href))), (G, gref, float(n2(gref))), (H.identity(), eye, 1.0)]

    def draw(depth):
        if depth == 0 or data.draw(st.booleans()):
            return leaves[data.draw(st.integers(0, 2))]
        op = data.draw(st.sampled_from(["+", "-", "*", "@", "T", "neg", "/"]))
        a, ar, an = draw(depth - 1)
        if op in ("+", "-", "@"):
            b, br, bn = draw(depth - 1)
            if op == "@":
                return a @ b, ar @ br, an * bn
            return (a + b, ar + br, an + bn) if op == "+" else (a - b, ar - br, an + bn)
        if op in ("T", "neg"):
            return (a.T, ar.T, an) if op == "T" else (-a, -ar, an)
        c = data.draw(st.floats(-3, 3, allow_nan=False).filter(lambda x: abs(x) > 1e-3))
        return (c * a, c * ar, abs(c) * an) if op == "*" else (a / c, ar / c, an / abs(c))

    A, ref, bound = draw(3)
    v = _vec(W, 2, seed=data.draw(st.integers(0, 9)))
    scale = 10 * bound * float(v.norm())  # up to 8 factors: a few more roundings than one
    assert close(A @ v, ref @ v, scale=scale)
    assert close(A.T @ v, ref.T @ v, scale=scale)
    assert close(v.T @ A, v.T @ ref, scale=scale)


# -- repr, shape, dtype, device -------------------------------------------------------
def test_repr_shape_dtype_device():
    H, G, _, _ = problem()
    W = H.shape[0]
    A = H + 0.5 * IdentityOperator(W) - G
    assert A.shape == (W, W) and A.dtype == DT and A.device == torch.device("cpu")
    r = repr(A)
    assert "Hessian(W=" in r and "IdentityOperator(W=" in r and "GaussNewton(W=" in r and "- " in r
    assert repr(H.T) == repr(H)
    assert ".T" in repr((H @ G).T)
    assert "InverseOperator" in repr(H.inverse(1.0))


# -- errors -------------------------------------------------------------------------------
def test_errors():
    H, _, _, _ = problem()
    W = H.shape[0]
    other = hessinv.Hessian(_model(widths=(3, 5, 2)), nn.MSELoss(), *_data())
    with pytest.raises(ValueError, match="sizes differ"):
        H + other
    with pytest.raises(ValueError, match="sizes differ"):
        H @ other
    m32 = _model().float()
    X, y = _data()
    H32 = hessinv.Hessian(m32, nn.MSELoss(), X.float(), y.float())
    with pytest.raises(TypeError, match="dtypes differ"):
        H + H32
    with pytest.raises(ValueError, match="devices differ"):
        H + IdentityOperator(W, device="meta")
    with pytest.raises(TypeError, match="only operators add.*identity"):
        H + 1.0
    with pytest.raises(TypeError, match="only operators add"):
        1.0 - H
    with pytest.raises(TypeError, match="compose operators with A @ B"):
        H * H
    with pytest.raises(ZeroDivisionError, match="divided by zero"):
        H / 0
    with pytest.raises(ValueError, match="must be finite"):
        float("nan") * H
    with pytest.raises(TypeError, match="factor in c \\* A must be a real number"):
        True * H
    with pytest.raises(TypeError, match="must be a scalar"):
        torch.ones(W, dtype=DT) * H
    with pytest.raises(ValueError, match="expected"):
        H @ torch.ones(W + 1, dtype=DT)
    with pytest.raises(TypeError, match="NumPy array of dtype float32"):
        H @ np.ones(W, dtype=np.float32)
    shapes = H.pipeline.param_shapes
    with pytest.raises(ValueError, match="mixes forms"):
        H @ [
            torch.ones(*s, 2, dtype=DT) if i else torch.ones(s, dtype=DT)
            for i, s in enumerate(shapes)
        ]
    with pytest.raises(ValueError, match="mixes forms"):
        H @ [torch.ones(*s, 2 + i, dtype=DT) for i, s in enumerate(shapes)]
    with pytest.raises(ValueError, match=r"v\[0\] has shape"):
        H @ ([torch.ones(7, dtype=DT)] + [torch.ones(s, dtype=DT) for s in shapes[1:]])
    with pytest.raises(ValueError, match="parameter shapes differ"):
        H + IdentityOperator(
            W, layout=hessinv.vectors.Layout(((W // 2,), (W - W // 2,)), DT, torch.device("cpu"))
        )
    with pytest.raises(ValueError, match="size must be a nonnegative int"):
        IdentityOperator(-1)


def test_stale_parameters_refused_through_the_algebra():
    model = _model(seed=5)
    X, y = _data()
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    A = 2 * (H + H.identity())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(hessinv.StaleOperatorError):
        A @ torch.ones(H.shape[0], dtype=DT)
    with pytest.raises(hessinv.StaleOperatorError):
        A.to_scipy()


# -- curvlinops interop (duck typing; skipped without curvlinops) ------------------------
def _spd():
    """``H + s I`` with smallest eigenvalue 1 (CG's assumption), and its dense reference."""
    H, _, href, _ = problem()
    W = H.shape[0]
    lam = torch.linalg.eigvalsh(href)
    s = 1.0 - float(lam[0])
    return H + s * H.identity(), href + s * torch.eye(W, dtype=DT), lam + s


def test_curvlinops_inverse_operators():
    curvlinops = pytest.importorskip("curvlinops")
    A, aref, lam = _spd()
    W = A.shape[0]
    v = _vec(W, 3)
    xref = torch.linalg.solve(aref, v)
    # linear_cg's own stopping rules (eps, stop_updating_after) are absolute: off here
    cg_args = {"tolerance": 1e-13, "max_iter": 10 * W, "eps": 1e-30, "stop_updating_after": 1e-30}
    cg = curvlinops.CGInverseLinearOperator(A, **cg_args)
    assert torch.linalg.norm(cg @ v - xref) <= 1e-11 * torch.linalg.norm(xref)
    H = A.terms[0][1]
    assert all(
        torch.linalg.norm(a - b) <= 1e-11 * torch.linalg.norm(xref)
        for a, b in zip(cg @ _split(H, v), _split(H, xref), strict=True)
    )
    lsmr = curvlinops.LSMRInverseLinearOperator(A, atol=1e-15, btol=1e-15, maxiter=20 * W)
    assert torch.linalg.norm(lsmr @ v - xref) <= 1e-9 * torch.linalg.norm(xref)
    # Neumann on B = A + t I with spectrum in [m, 2m]: converges like 2^-k with scale 1/(2m)
    lmax, lmin = float(lam[-1]), float(lam[0])
    t = lmax - 2 * lmin
    B = A + t * A.identity()
    bref = aref + t * torch.eye(W, dtype=DT)
    neu = curvlinops.NeumannInverseLinearOperator(B, num_terms=80, scale=1 / (lmax + t) * 1.0)
    yref = torch.linalg.solve(bref, v)
    assert torch.linalg.norm(neu @ v - yref) <= 1e-9 * torch.linalg.norm(yref)


def test_curvlinops_estimators():
    curvlinops = pytest.importorskip("curvlinops")
    H, _, href, _ = problem()
    torch.manual_seed(0)
    m = H.shape[0] - 1
    # Girard-Hutchinson (Rademacher): Var = 2 (||H||_F^2 - sum_i H_ii^2) / m; a 6-sigma bound
    tr, sd = (
        float(href.trace()),
        float((2 * (href.norm() ** 2 - (href.diag() ** 2).sum()) / m) ** 0.5),
    )
    assert abs(float(curvlinops.hutchinson_trace(H, m)) - tr) <= 6 * sd
    # diagonal: Var_i = sum_{j != i} H_ij^2 / m
    est = curvlinops.hutchinson_diag(H, m)
    sd_i = (((href**2).sum(1) - href.diag() ** 2) / m).sqrt()
    assert bool((abs(est - href.diag()) <= 6 * sd_i + TOL * href.norm()).all())
    # Hutch++ is exact on a matrix of rank below its sketch: a Gauss-Newton matrix of rank
    # <= N o = 8 (W = 50), sketched with 10 columns
    model = _model(seed=2, widths=(3, 8, 2))
    X, y = _data(n=4)
    G = hessinv.GaussNewton(model, nn.MSELoss(reduction="sum"), X, y)
    gref = _ggn_reference(model, X, y)
    assert int(torch.linalg.matrix_rank(gref)) <= 8 and G.shape[0] == 50
    est = float(curvlinops.hutchpp_trace(G, 30))
    assert abs(est - float(gref.trace())) <= 1e-10 * float(gref.trace())


def test_curvlinops_operators_enter_the_algebra_and_back():
    curvlinops = pytest.importorskip("curvlinops")
    H, _, href, _ = problem()
    model = _model()
    X, y = _data()

    loss = nn.MSELoss(reduction="sum")  # the sum of squares of problem()
    C = curvlinops.HessianLinearOperator(model, loss, list(model.parameters()), [(X, y)])
    v = _vec(H.shape[0], 2)
    D = H - C  # hessinv's algebra on a curvlinops operator (an independent Hessian)
    assert float(torch.linalg.norm(D @ v)) <= TOL * float(href.norm() * v.norm())
    S = C + H  # curvlinops' algebra on a hessinv operator (its _matmat list convention)
    assert close(S @ v, 2 * href @ v)
    P = H @ C
    assert close(P @ v, href @ (href @ v), scale=float(href.norm() ** 2 * v.norm()))


def test_data_set_operator_in_the_algebra():
    """``Hessian(model, loss, data=batches)`` (sum over batches) is an operator like any other."""
    model = _model(seed=4)
    X, y = _data(n=8)
    loss = nn.MSELoss(reduction="sum")
    f, x0 = reference_loss_fn(model, loss, X, y)
    href = torch.func.hessian(f)(x0)
    H = hessinv.Hessian(model, loss, data=[(X[:3], y[:3]), (X[3:], y[3:])])
    v = _vec(H.shape[0], 2)
    A = 2 * H - 0.5 * H.identity()
    aref = 2 * href - 0.5 * torch.eye(H.shape[0], dtype=DT)
    assert close(A @ v, aref @ v) and close(v.T @ A, v.T @ aref)
    assert close(A.to_dense(), aref)
    out = H @ _split(H, v)
    ref = href @ v
    assert all(close(a, b, float(ref.norm())) for a, b in zip(out, _split(H, ref), strict=True))
