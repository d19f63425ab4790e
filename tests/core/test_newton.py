"""Newton peak search on the sphere."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tractfunc.core import sh
from tractfunc.core.newton import peak
from tractfunc.core.sphere import fibonacci_sphere

from conftest import unit


def _lobes(axes, weights=None, kappa=20.0, lmax=8):
    """SH coefficients of sum_i w_i exp(-kappa (1 - (u.a_i)^2)), fitted on a dense sphere."""
    d = fibonacci_sphere(3000).numpy()
    amp = sum((w or 1.0) * np.exp(-kappa * (1 - (d @ unit(a)) ** 2))
              for a, w in zip(axes, weights or [None] * len(axes)))
    B = sh.basis(torch.as_tensor(d), lmax).numpy()
    return torch.as_tensor(np.linalg.lstsq(B, amp, rcond=None)[0])


@settings(max_examples=30, deadline=None)
@given(a=st.tuples(st.floats(-1, 1), st.floats(-1, 1), st.floats(-1, 1)).filter(lambda v: np.linalg.norm(v) > 0.1),
       eps=st.tuples(st.floats(-0.2, 0.2), st.floats(-0.2, 0.2), st.floats(-0.2, 0.2)))
def test_exact_peak_finds_single_lobe_axis_anywhere_including_pole(a, eps):
    axis = unit(a)
    c = _lobes([axis])
    u0 = torch.as_tensor(unit(axis + np.array(eps)))
    p = peak(c, u0)
    assert torch.isfinite(p.dir).all()
    assert abs(float(p.dir @ torch.as_tensor(axis))) > math.cos(1e-3)


@pytest.mark.parametrize("axis", [[0, 0, 1], [0, 0, -1], [1, 0, 0], [0, 1, 0]])
def test_exact_peak_on_axes(axis):
    c = _lobes([axis])
    p = peak(c, torch.as_tensor(unit(np.array(axis) + [0.05, -0.03, 0.02])))
    assert abs(float(p.dir @ torch.as_tensor(unit(axis)))) > math.cos(1e-3)


def test_peak_is_local_maximum_and_nearest_of_two():
    a, b = unit([1, 0.2, 0.3]), unit([-0.1, 1, 0.25])
    c = _lobes([a, b], weights=[1.0, 0.7])
    table = sh.LegendreTable(8, dtype=torch.float64)
    for tab in (None, table):
        pa = peak(c, torch.as_tensor(unit(a + [0.1, 0.1, 0])), tab)
        pb = peak(c, torch.as_tensor(unit(b + [0.1, 0, -0.1])), tab)
        assert float(pa.dir @ torch.as_tensor(a)) > 0.999 and float(pb.dir @ torch.as_tensor(b)) > 0.999
        # local maximum: the amplitude drops in every tangent direction
        for p in (pa, pb):
            u = p.dir.numpy()
            for k in range(8):
                t = np.cross(u, [math.cos(k), math.sin(k), 0.3]); t /= np.linalg.norm(t)
                v = torch.as_tensor(unit(u + 0.02 * t))
                assert float(sh.amplitude(c, v)) < float(sh.amplitude(c, p.dir)) + 1e-12
        assert float(pa.amp) > float(pb.amp)


def test_batched_early_exit_and_vmap_agree():
    torch.manual_seed(0)
    a = unit(np.random.default_rng(0).normal(size=(16, 3)))
    cs = torch.stack([_lobes([x]) for x in a])
    u0 = torch.as_tensor(unit(a + 0.1 * np.random.default_rng(1).normal(size=(16, 3))))
    p_fixed = peak(cs, u0)
    p_early = peak(cs, u0, early_exit=True)
    p_vmap = torch.func.vmap(lambda c, u: tuple(peak(c, u)))(cs, u0)
    assert torch.allclose(p_fixed.dir, p_early.dir, atol=0) and torch.allclose(p_fixed.amp, p_early.amp, atol=0)
    assert torch.allclose(p_fixed.dir, p_vmap[0], atol=1e-15)


def test_flat_fod_gives_finite_or_documented_nan():
    c = torch.zeros(45, dtype=torch.float64)
    c[0] = 1.0   # isotropic: gradient zero, Newton converges immediately where it starts
    u0 = torch.as_tensor(unit([0.3, 0.4, 0.5]))
    p = peak(c, u0)
    assert torch.allclose(p.dir, u0) and math.isclose(float(p.amp), 0.28209479177387814, rel_tol=1e-12)
    z = peak(torch.zeros(45), torch.tensor([0.0, 0.0, 1.0]))
    assert float(z.amp) == 0.0 and torch.isfinite(z.dir).all()
