"""Trilinear sampling with MRtrix3's edge and zero-voxel rules."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tractfunc.core.interpolate import nearest_value, round_half_away, sample_fod, trilinear


def _linear_volume(dims, coef, C=3):
    ii = np.stack(np.meshgrid(*[np.arange(d) for d in dims], indexing="ij"), -1).astype(np.float64)
    vol = np.stack([ii @ coef[c, :3] + coef[c, 3] for c in range(C)], -1)
    return torch.as_tensor(vol)


@settings(max_examples=60, deadline=None)
@given(p=st.tuples(st.floats(0, 4), st.floats(0, 5), st.floats(0, 3)), seed=st.integers(0, 1000))
def test_exact_on_linear_fields_inside_centres(p, seed):
    coef = np.random.default_rng(seed).normal(size=(3, 4))
    vol = _linear_volume((5, 6, 4), coef)
    vox = torch.tensor(p, dtype=torch.float64)
    s = trilinear(vol, vox)
    expect = coef[:, :3] @ np.array(p) + coef[:, 3]
    assert s.inside
    # exact up to MRtrix's rule that drops corner weights below 1e-6 (at most 8 such corners)
    assert np.allclose(s.values.numpy(), expect, atol=8e-6 * float(vol.abs().max()) + 1e-12, rtol=0)
    w = np.array(p) - np.floor(p)
    if np.all((w > 1e-2) & (w < 1 - 1e-2)):     # no tiny weights: exact to rounding
        assert np.allclose(s.values.numpy(), expect, atol=1e-9)


def test_edge_rules_match_mrtrix():
    vol = torch.arange(4 * 3 * 2, dtype=torch.float64).reshape(4, 3, 2, 1) + 1
    # outside at <= -0.5 and >= dim - 0.5
    pts = torch.tensor([[-0.5, 1, 0.5], [3.5, 1, 0.5], [0, 2.5, 0], [0, 0, 1.5], [-0.4999, 0, 0], [3.4999, 2, 1]],
                       dtype=torch.float64)
    s = trilinear(vol, pts)
    assert s.inside.tolist() == [False, False, False, False, True, True]
    # between the last centre and the edge the value is clamped to the edge voxel (no extrapolation)
    assert float(s.values[4, 0]) == float(vol[0, 0, 0, 0])
    assert float(s.values[5, 0]) == float(vol[3, 2, 1, 0])


def test_weights_below_1e6_are_dropped_like_mrtrix():
    vol = torch.zeros(3, 3, 3, 1, dtype=torch.float64)
    vol[1, 1, 1] = 1.0
    # corner (1,1,1) gets weight f^3: dropped below 1e-6 (f < 0.01), kept above
    tiny = trilinear(vol, torch.tensor([0.0099, 0.0099, 0.0099], dtype=torch.float64))
    above = trilinear(vol, torch.tensor([0.011, 0.011, 0.011], dtype=torch.float64))
    assert float(tiny.values[0]) == 0.0
    assert float(above.values[0]) == pytest.approx(0.011 ** 3)


def test_round_half_away_from_zero():
    x = torch.tensor([-1.5, -0.5, 0.5, 1.5, 2.5, -2.4999])
    assert round_half_away(x).tolist() == [-2.0, -1.0, 1.0, 2.0, 3.0, -2.0]


def test_zero_nearest_voxel_counts_as_outside():
    vol = torch.ones(4, 4, 4, 2, dtype=torch.float64)
    vol[2, 2, 2] = 0
    nonzero = (vol != 0).any(-1)
    A = torch.eye(4, dtype=torch.float64)
    s = sample_fod(vol, nonzero, A, torch.tensor([[2.2, 1.9, 2.4], [2.6, 2.0, 2.0]], dtype=torch.float64))
    assert s.inside.tolist() == [False, True]
    assert torch.all(s.values[0] == 0)


def test_nearest_value_bounds():
    m = torch.ones(3, 3, 3, dtype=torch.bool)
    v = torch.tensor([[-0.49, 0, 0], [-0.5, 0, 0], [2.49, 2, 2], [2.5, 2, 2]], dtype=torch.float64)
    assert nearest_value(m, v).tolist() == [True, False, True, False]


def test_gradient_wrt_volume_and_points():
    torch.manual_seed(0)
    vol = torch.randn(4, 4, 4, 2, dtype=torch.float64, requires_grad=True)
    p = torch.tensor([[1.3, 2.1, 0.7]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, q: trilinear(v, q).values, (vol, p))


def test_left_image_is_complement_of_sample_inside():
    from tractfunc.core.stop import left_image
    torch.manual_seed(0)
    vol = torch.randn(5, 6, 4, 3, dtype=torch.float64)
    vol[2, 2, 2] = 0
    nonzero = (vol != 0).any(-1)
    A = torch.tensor([[0, -2.0, 0, 4], [1.5, 0, 0, -3], [0, 0, 2.5, 1], [0, 0, 0, 1]], dtype=torch.float64)
    inv = torch.linalg.inv(A)
    pos = torch.randn(500, 3, dtype=torch.float64) * 8
    assert torch.equal(left_image(nonzero, inv, pos), ~sample_fod(vol, nonzero, inv, pos).inside)
