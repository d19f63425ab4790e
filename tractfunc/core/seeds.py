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


def grid_per_voxel_np(mask, affine, n: int) -> np.ndarray:
    """tckgen ``-seed_grid_per_voxel``: an n x n x n grid of seeds in every non-zero voxel of ``mask`` (X, Y, Z),
    at offsets -1/2 + (2k + 1) / (2n) voxel along each axis, k < n (symmetric about the voxel centre, so the same
    scanner points in any voxel-axis order).  Returns (M n^3, 3) float64 scanner mm, voxel after voxel.
    Raises ValueError for n < 1 or an empty mask."""
    if n < 1:
        raise ValueError(f"grid per voxel: expected n >= 1, got {n}")
    vox = seed_voxels(mask)
    k = -0.5 + (2 * np.arange(n) + 1) / (2.0 * n)
    off = np.stack(np.meshgrid(k, k, k, indexing="ij"), -1).reshape(-1, 3)
    pick = np.repeat(np.arange(vox.shape[0]), len(off))
    return voxel_points(vox, pick, np.tile(off, (vox.shape[0], 1)), affine)


def random_per_voxel_np(mask, affine, n: int, rng: np.random.Generator) -> np.ndarray:
    """tckgen ``-seed_random_per_voxel``: n seeds uniformly at random in every non-zero voxel of ``mask`` (X, Y, Z).
    Returns (M n, 3) float64 scanner mm, voxel after voxel.  Raises ValueError for n < 1 or an empty mask."""
    if n < 1:
        raise ValueError(f"random per voxel: expected n >= 1, got {n}")
    vox = seed_voxels(mask)
    pick = np.repeat(np.arange(vox.shape[0]), n)
    return voxel_points(vox, pick, rng.random((len(pick), 3)) - 0.5, affine)


def weighted_in_image_np(image, affine, n: int, rng: np.random.Generator) -> np.ndarray:
    """tckgen ``-seed_rejection``: n seeds with voxel probability proportional to the value of ``image`` (X, Y, Z)
    (values >= 0; tckgen's rejection sampling without interpolation), uniformly within the voxel.  Returns (n, 3)
    float64 scanner mm.  Raises ValueError for negative or non-finite values or an empty image."""
    w = np.asarray(image, dtype=np.float64)
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("rejection sampling needs finite values >= 0 in the seed image")
    vox = seed_voxels(w)
    p = w[tuple(vox.T)]
    return voxel_points(vox, rng.choice(len(vox), n, p=p / p.sum()), rng.random((n, 3)) - 0.5, affine)


def sphere_points_np(centre, radius: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """tckgen ``-seed_sphere``: n points uniformly in the ball of ``radius`` mm around ``centre`` (3,) scanner mm
    (rejection sampling from the enclosing cube, as tckgen).  Returns (n, 3) float64."""
    parts, have = [], 0
    while have < n:
        p = rng.random((max(2 * (n - have), 16), 3)) * 2.0 - 1.0
        p = p[(p * p).sum(1) <= 1.0]
        parts.append(p)
        have += len(p)
    unit = np.concatenate(parts)[:n] if parts else np.zeros((0, 3))
    return np.asarray(centre, dtype=np.float64)[None] + float(radius) * unit


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



def _any_in_boxes(tgt: np.ndarray, centre: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Whether each box [centre - radius, centre + radius] (n, 3) in voxel coordinates of the bool image
    ``tgt`` (X, Y, Z) holds a True voxel; by a summed-volume table (8 look-ups per box)."""
    dims = np.array(tgt.shape)
    lo = np.clip(np.ceil(centre - radius), 0, dims).astype(np.int64)
    hi = np.clip(np.floor(centre + radius) + 1, 0, dims).astype(np.int64)   # half-open [lo, hi)
    table = np.zeros(tuple(dims + 1), dtype=np.int64)
    table[1:, 1:, 1:] = tgt.cumsum(0).cumsum(1).cumsum(2)
    total = np.zeros(len(centre), dtype=np.int64)
    for corner in range(8):
        pick = [hi[:, k] if corner >> k & 1 else lo[:, k] for k in range(3)]
        total += (-1) ** (3 - bin(corner).count("1")) * table[pick[0], pick[1], pick[2]]
    return (total > 0) & np.all(hi > lo, axis=1)


def reachable(voxels: np.ndarray, seed_affine, target, target_affine, margin: float = 1.0) -> np.ndarray:
    """Which seed voxels can hold a seed on or next to a non-zero voxel of ``target``.

    voxels: (M, 3) int voxel indices of the seed image; seed_affine / target_affine: (4, 4) voxel -> scanner
    mm; target: (X, Y, Z) image (non-zero = reachable; an all-ones image gives its field of view).  A seed
    voxel counts when the axis-aligned box (in target voxels) around its whole extent, widened by ``margin``
    voxels (the trilinear neighbours), holds a non-zero target voxel: conservative, never False for a seed
    voxel that can reach the target.  Returns (M,) bool."""
    T = np.linalg.inv(np.asarray(target_affine, dtype=np.float64)) @ np.asarray(seed_affine, dtype=np.float64)
    c = np.asarray(voxels, dtype=np.float64).reshape(-1, 3) @ T[:3, :3].T + T[:3, 3]
    return _any_in_boxes(np.asarray(target) != 0, c, 0.5 * np.abs(T[:3, :3]).sum(1) + margin)


def points_reach(points: np.ndarray, target, target_affine, margin: float = 1.0) -> np.ndarray:
    """:func:`reachable` for seed points (n, 3) scanner mm: whether each lies within ``margin`` voxels of a
    non-zero voxel of ``target`` (X, Y, Z) with voxel -> scanner ``target_affine`` (4, 4).  Returns (n,) bool."""
    inv = np.linalg.inv(np.asarray(target_affine, dtype=np.float64))
    c = np.asarray(points, dtype=np.float64).reshape(-1, 3) @ inv[:3, :3].T + inv[:3, 3]
    return _any_in_boxes(np.asarray(target) != 0, c, np.full(3, float(margin)))
