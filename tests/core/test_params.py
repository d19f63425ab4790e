"""tckgen defaults and validation."""
import math

import pytest

from tractfunc.core.params import resolve


def test_defaults_match_tckgen_header_for_philips_voxels():
    # tckinfo of tckgen 3.0.3 on this FOD (1.75 x 1.75 x 2.5 mm): step_size 0.197093382, max_dist 197.093384,
    # min_dist 9.85466862, threshold 0.100000001; longest track 1003 vertices, shortest 51
    p = resolve([1.75, 1.75, 2.5])
    assert math.isclose(p.step, 0.197093382, rel_tol=1e-8)
    assert math.isclose(p.max_length, 197.093384, rel_tol=1e-8)
    assert math.isclose(p.min_length, 9.85466862, rel_tol=1e-8)
    assert (p.max_points, p.min_points) == (1003, 51)
    assert math.isclose(p.cos_angle_step, math.cos(math.radians(60)), rel_tol=1e-6) and p.cos_angle_rk4 == -1


def test_rk4_defaults():
    p = resolve([1.75, 1.75, 2.5], rk4=True)
    assert math.isclose(p.step, 0.25 * 1.97093382, rel_tol=1e-7)
    assert (p.max_points, p.min_points) == (403, 21)
    assert p.cos_angle_step == -1 and math.isclose(p.cos_angle_rk4, 0.5, rel_tol=1e-6)


@pytest.mark.parametrize("kw,msg", [(dict(step=0), "step"), (dict(step=-1), "step"), (dict(angle=0), "angle"),
                                    (dict(angle=181), "angle"), (dict(cutoff=-0.1), "cutoff"),
                                    (dict(min_length=-1), "lengths"), (dict(max_length=0), "lengths")])
def test_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        resolve([2, 2, 2], **kw)
