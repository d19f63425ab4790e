"""tractfunc.core.sphere: the one Fibonacci sphere (phantom, CSD peaks, parity's seed-direction search)."""
import math

import pytest
import torch

from tractfunc.core.sphere import fibonacci_sphere


@pytest.mark.parametrize("n", [1, 2, 7, 500, 4000])
def test_unit_vectors_of_requested_count(n):
    v = fibonacci_sphere(n)
    assert v.shape == (n, 3) and v.dtype == torch.float64
    assert torch.allclose(v.norm(dim=-1), torch.ones(n, dtype=torch.float64), atol=1e-15, rtol=0)


def test_near_uniform_without_gaps_or_clumps():
    """Every direction has a point within ~ the mean spacing sqrt(4 pi / n), no two points are much closer
    than it, and the points balance out (centroid at the origin)."""
    n = 1000
    v = fibonacci_sphere(n)
    spacing = math.sqrt(4 * math.pi / n)
    probes = torch.nn.functional.normalize(torch.randn(5000, 3, generator=torch.Generator().manual_seed(0),
                                                       dtype=torch.float64), dim=-1)
    farthest = torch.arccos((probes @ v.T).max(-1).values.clamp(max=1)).max()
    cos = (v @ v.T).fill_diagonal_(-1)
    closest = torch.arccos(cos.max(-1).values.clamp(max=1)).min()
    assert farthest < 0.8 * spacing, (farthest, spacing)
    assert closest > 0.6 * spacing, (closest, spacing)
    assert v.mean(0).norm() < 1.0 / n


def test_dtype_and_device_follow_the_arguments():
    v64, v32 = fibonacci_sphere(50), fibonacci_sphere(50, torch.float32, torch.device("cpu"))
    assert v32.dtype == torch.float32 and v32.device.type == "cpu"
    assert torch.equal(v32, v64.to(torch.float32))


def test_rejects_empty():
    with pytest.raises(ValueError, match="n >= 1"):
        fibonacci_sphere(0)
