"""Seed generation, with randomness only from an explicit ``torch.Generator``."""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def voxel_to_world(vox: Tensor, affine: Tensor) -> Tensor:
    """Voxel coordinates (..., 3) -> scanner mm (..., 3) with a (4, 4) affine (float64 arithmetic)."""
    A = affine.to(torch.float64)
    return vox.to(torch.float64) @ A[:3, :3].T + A[:3, 3]


def random_in_mask(mask: Tensor, affine, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """n seed points uniformly in a seed image, as tckgen ``-seed_image`` draws them: a uniformly chosen
    non-zero voxel plus a uniform offset within it.

    mask: (X, Y, Z) bool/numeric; affine: (4, 4) voxel -> scanner.  Returns (n, 3) float64 scanner mm (CPU).
    Raises ValueError for an empty mask."""
    idx = torch.nonzero(torch.as_tensor(mask).cpu() != 0)
    if idx.shape[0] == 0:
        raise ValueError("seed image has no non-zero voxel; expected at least one voxel to seed from")
    pick = torch.randint(0, idx.shape[0], (n,), generator=generator)
    off = torch.rand(n, 3, generator=generator, dtype=torch.float64) - 0.5
    return voxel_to_world(idx[pick].to(torch.float64) + off, torch.as_tensor(affine, dtype=torch.float64))
