"""Seed generation: points uniformly in a seed image (as tckgen ``-seed_image`` draws them: a uniformly
chosen non-zero voxel plus a uniform offset within it) and uniform start directions.

Randomness comes only from an explicit generator: a ``torch.Generator`` for the tensor API
(:func:`random_in_mask`, :func:`random_directions`), a ``numpy.random.Generator`` for
the command line, which does not import torch on its native path (:func:`random_in_mask_np`,
:func:`random_directions_np`).  Both draw the same kinds of numbers and share :func:`voxel_points`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    import torch


def seed_voxels(mask) -> np.ndarray:
    """(M, 3) int64 indices of the non-zero voxels of a seed image (X, Y, Z); ValueError when empty."""
    idx = np.argwhere(np.asarray(mask) != 0)
    if idx.shape[0] == 0:
        raise ValueError("seed image has no non-zero voxel; expected at least one voxel to seed from")
    return idx


def voxel_points(voxels: np.ndarray, pick: np.ndarray, offsets: np.ndarray, affine) -> np.ndarray:
    """Scanner points (n, 3) float64 mm at ``voxels[pick] + offsets`` (offsets in [-0.5, 0.5) voxel) under
    the (4, 4) voxel -> scanner ``affine``."""
    A = np.asarray(affine, dtype=np.float64)
    v = voxels[pick].astype(np.float64) + offsets
    return v @ A[:3, :3].T + A[:3, 3]


def random_in_mask(mask, affine, n: int, generator: Optional["torch.Generator"] = None) -> "torch.Tensor":
    """n seed points uniformly in a seed image, drawn from a ``torch.Generator``.

    mask: (X, Y, Z) bool/numeric (tensor or array); affine: (4, 4) voxel -> scanner.  Returns (n, 3) float64
    scanner mm (CPU tensor).  Raises ValueError for an empty mask."""
    import torch
    m = mask.cpu().numpy() if torch.is_tensor(mask) else mask
    vox = seed_voxels(m)
    pick = torch.randint(0, vox.shape[0], (n,), generator=generator).numpy()
    off = (torch.rand(n, 3, generator=generator, dtype=torch.float64) - 0.5).numpy()
    aff = affine.cpu().numpy() if torch.is_tensor(affine) else affine
    return torch.from_numpy(voxel_points(vox, pick, off, aff))


def random_in_mask_np(mask, affine, n: int, rng: np.random.Generator) -> np.ndarray:
    """:func:`random_in_mask` drawn from a ``numpy.random.Generator``: (n, 3) float64 scanner mm."""
    vox = seed_voxels(mask)
    return voxel_points(vox, rng.integers(0, vox.shape[0], n), rng.random((n, 3)) - 0.5, affine)


def unit_rows(v: np.ndarray) -> np.ndarray:
    """Rows of (n, 3) scaled to unit length."""
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def random_directions(n: int, generator: Optional["torch.Generator"] = None, dtype=None,
                      device=None) -> "torch.Tensor":
    """(n, 3) unit vectors uniform on the sphere (normalised Gaussian draws), drawn in float64 on the CPU
    from ``generator``, then cast to ``dtype`` (default float32) and moved to ``device``."""
    import torch
    v = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v.to(dtype=torch.float32 if dtype is None else dtype, device=device)


def random_directions_np(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) float64 unit vectors uniform on the sphere (normalised Gaussian draws)."""
    return unit_rows(rng.standard_normal((n, 3)))
