"""The Fibonacci sphere: ``n`` near-uniform unit vectors on the whole sphere (golden-angle spiral).

Point ``k`` (k = 0 .. n-1) sits at height ``z_k = 1 - (2k + 1) / n`` (equal-area bands) and azimuth
``pi (1 + sqrt 5) (k + 1/2)`` (the golden angle apart). Neighbours are about ``sqrt(4 pi / n)`` radians apart
(~3.2 degrees at n = 4000). Deterministic, no randomness.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

Tensor = torch.Tensor


def fibonacci_sphere(n: int, dtype: torch.dtype = torch.float64, device: Optional[torch.device] = None) -> Tensor:
    """(n, 3) unit vectors, near-uniform on the sphere, computed in float64 and returned in ``dtype`` on
    ``device``. ``n`` >= 1."""
    if n < 1:
        raise ValueError(f"fibonacci_sphere needs n >= 1 points, got {n}")
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    th = math.pi * (1 + 5 ** 0.5) * i
    r = torch.sqrt(1 - z * z)
    return torch.stack([r * torch.cos(th), r * torch.sin(th), z], 1).to(dtype=dtype, device=device)
