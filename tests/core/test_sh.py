"""SH basis, derivatives and the tckgen Legendre table."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tractfunc.core import sh

from conftest import unit

dirs_st = st.tuples(st.floats(-1, 1), st.floats(-1, 1), st.floats(-1, 1)).filter(
    lambda v: 1e-3 < math.sqrt(sum(x * x for x in v)))


@pytest.mark.parametrize("lmax", [0, 2, 4, 6, 8, 10, 12])
def test_basis_matches_dipy_tournier07(lmax):
    from dipy.reconst.shm import real_sh_tournier
    rng = np.random.default_rng(lmax)
    u = unit(rng.normal(size=(300, 3)))
    u[:4] = [[0, 0, 1], [0, 0, -1], [1, 0, 0], unit([0, 1e-7, 1])]
    th, ph = np.arctan2(np.hypot(u[:, 0], u[:, 1]), u[:, 2]), np.arctan2(u[:, 1], u[:, 0])
    ref, _, _ = real_sh_tournier(lmax, th, ph, legacy=False)
    got = sh.basis(torch.as_tensor(u), lmax).numpy()
    assert np.abs(got - ref).max() < 1e-12


@pytest.mark.parametrize("n,lmax", [(1, 0), (6, 2), (15, 4), (28, 6), (45, 8), (66, 10), (91, 12)])
def test_lmax_for(n, lmax):
    assert sh.lmax_for(n) == lmax and sh.n_coeffs(lmax) == n


@pytest.mark.parametrize("n", [2, 10, 44, 46, 0])
def test_lmax_for_rejects_bad_counts(n):
    with pytest.raises(ValueError, match="even-degree"):
        sh.lmax_for(n)


def _tangent_fd(c, u, h=1e-5):
    """Finite-difference gradient/Hessian of the amplitude along geodesics in two tangent directions."""
    a = np.cross(u, [0.3, 0.5, 0.8]); a /= np.linalg.norm(a)
    b = np.cross(u, a)

    def f(s, t):
        v = u * math.cos(math.hypot(s, t)) + (s * a + t * b) * (math.sin(math.hypot(s, t)) / max(math.hypot(s, t), 1e-300))
        return float(sh.amplitude(c, torch.as_tensor(v)))
    g = np.array([(f(h, 0) - f(-h, 0)) / (2 * h), (f(0, h) - f(0, -h)) / (2 * h)])
    H = np.zeros((2, 2))
    H[0, 0] = (f(h, 0) - 2 * f(0, 0) + f(-h, 0)) / h ** 2
    H[1, 1] = (f(0, h) - 2 * f(0, 0) + f(0, -h)) / h ** 2
    H[0, 1] = H[1, 0] = (f(h, h) - f(h, -h) - f(-h, h) + f(-h, -h)) / (4 * h * h)
    return g, H, a, b


@settings(max_examples=40, deadline=None)
@given(v=dirs_st, seed=st.integers(0, 10_000))
def test_jet_matches_finite_differences_everywhere(v, seed):
    u = unit(v)
    c = torch.as_tensor(np.random.default_rng(seed).normal(size=45))
    j = sh.sh_jet(c, torch.as_tensor(u))
    g_fd, H_fd, a, b = _tangent_fd(c, u)
    E = np.stack([a, b], 1)                               # (3, 2) tangent basis
    assert np.allclose(E.T @ j.grad.numpy(), g_fd, atol=2e-6 * (1 + np.abs(g_fd).max()))
    assert np.allclose(E.T @ j.hess.numpy() @ E, H_fd, atol=2e-3 * (1 + np.abs(H_fd).max()))
    assert abs(float(j.grad.numpy() @ u)) < 1e-10         # tangent
    assert np.allclose(j.hess.numpy() @ u, 0, atol=1e-9)


@pytest.mark.parametrize("u", [[0, 0, 1], [0, 0, -1], [1e-9, 0, 1], [0, -1e-5, -1]])
def test_jet_finite_at_and_near_pole(u):
    c = torch.randn(45, dtype=torch.float64)
    uu = torch.as_tensor(unit(u))
    j = sh.sh_jet(c, uu)
    for t in j:
        assert torch.isfinite(t).all()
    # gradient of the jet wrt coefficients and direction is finite at the pole too
    c.requires_grad_(True)
    uu = uu.clone().requires_grad_(True)
    j = sh.sh_jet(c, uu)
    (j.amp + j.grad.sum() + j.hess.sum()).backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(uu.grad).all()


def test_jet_matches_autograd_float64():
    torch.manual_seed(0)
    c = torch.randn(45, dtype=torch.float64)
    u = torch.as_tensor(unit([0.2, -0.4, 0.7]))
    f = lambda v: sh.amplitude(c, v)
    g = torch.autograd.functional.jacobian(f, u)
    H = torch.autograd.functional.hessian(f, u)
    P = torch.eye(3, dtype=torch.float64) - torch.outer(u, u)
    j = sh.sh_jet(c, u)
    assert torch.allclose(j.grad, P @ g, atol=1e-12)
    assert torch.allclose(j.hess, P @ H @ P - (u @ g) * P, atol=1e-11)


def test_legendre_table_close_to_exact_and_mrtrix_jet_close_to_exact():
    torch.manual_seed(1)
    tab = sh.LegendreTable(8, dtype=torch.float64)
    c = torch.randn(200, 45, dtype=torch.float64)
    u = torch.as_tensor(unit(np.random.default_rng(2).normal(size=(200, 3))))
    a = sh.mrtrix_line_jet(c, u, tab)
    b = sh.exact_line_jet(c, u)
    # table interpolation error (512 elevations) is ~1e-4 relative for lmax 8
    assert torch.allclose(a.amp, b.amp, atol=2e-3 * c.abs().max())
    assert torch.allclose(a.slope, b.slope, rtol=0, atol=2e-2 * c.abs().max())
    cosang = (a.gdir * b.gdir).sum(-1)
    assert (cosang[b.slope > 1] > 0.999).all()


def test_mrtrix_line_jet_falls_back_to_exact_near_pole():
    c = torch.randn(45, dtype=torch.float64)
    u = torch.as_tensor(unit([1e-6, 2e-6, 1]))
    a = sh.mrtrix_line_jet(c, u, sh.LegendreTable(8, dtype=torch.float64))
    b = sh.exact_line_jet(c, u)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
