"""tractfunc.core.seeds: start directions with an explicit generator."""
import pytest
import torch

from tractfunc.core.seeds import random_directions


def test_random_directions_are_uniform_unit_vectors():
    v = random_directions(20000, torch.Generator().manual_seed(0), torch.float64)
    assert v.shape == (20000, 3) and v.dtype == torch.float64
    assert torch.allclose(v.norm(dim=-1), torch.ones(20000, dtype=torch.float64), atol=1e-15, rtol=0)
    assert v.mean(0).abs().max() < 0.02                                   # no preferred direction
    second = v.T @ v / len(v)                                             # isotropic: E[v v^T] = I / 3
    assert torch.allclose(second, torch.eye(3, dtype=torch.float64) / 3, atol=0.01)


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float64])
def test_random_directions_follow_the_generator_and_dtype(dtype):
    a = random_directions(5, torch.Generator().manual_seed(3), dtype)
    b = random_directions(5, torch.Generator().manual_seed(3), dtype)
    c = random_directions(5, torch.Generator().manual_seed(4), dtype)
    assert a.dtype == (dtype or torch.float32) and torch.equal(a, b) and not torch.equal(a, c)
