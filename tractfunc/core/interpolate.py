"""Sampling volumes at scanner-space points with MRtrix3's rules.

Frames: ``pos`` is (..., 3) in scanner (RAS) millimetres; ``world_to_voxel`` is the (4, 4) inverse of the
NIfTI affine; voxel coordinates put voxel centres on integers.

Rules (MRtrix3 ``Interp::Masked<Interp::Linear>``):
* a point is outside when any voxel coordinate is ``<= -0.5`` or ``>= dim - 0.5``;
* trilinear weights, with the fractional offset set to 0 beyond the outermost voxel centres (edge clamp),
  and weights below 1e-6 dropped;
* a point whose nearest voxel (round half away from zero) holds only zeros counts as outside.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .arrays import as_tensor

Tensor = torch.Tensor

WEIGHT_EPS = 1e-6   # trilinear weights in (0, WEIGHT_EPS) are dropped (MRtrix3's rule, see trilinear)


def to_voxel(pos: Tensor, world_to_voxel: Tensor) -> Tensor:
    """Scanner mm (..., 3) -> voxel coordinates (..., 3), computed in the dtype of ``world_to_voxel``."""
    A = world_to_voxel.to(device=pos.device)
    p = pos.to(A.dtype)
    return p @ A[:3, :3].T + A[:3, 3]


def round_half_away(x: Tensor) -> Tensor:
    """``std::round``: halves round away from zero (torch.round rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def inside_bounds(vox: Tensor, dims) -> Tensor:
    """(..., 3) voxel coords -> (...,) bool: strictly inside (-0.5, dim - 0.5) on every axis."""
    d = torch.as_tensor(dims, dtype=vox.dtype, device=vox.device)
    return ((vox > -0.5) & (vox < d - 0.5)).all(-1)


def flat_index(ix: Tensor, iy: Tensor, iz: Tensor, dims) -> Tensor:
    """Integer voxel indices (...,) each, grid ``dims`` (X, Y, Z) -> (...,) row index into the volume
    reshaped to (X * Y * Z, C) (C order)."""
    return (ix * dims[1] + iy) * dims[2] + iz


class Sample(NamedTuple):
    """values: (..., C) interpolated channels (zeros where outside); inside: (...,) bool."""
    values: Tensor
    inside: Tensor


def trilinear(volume: Tensor, vox: Tensor) -> Sample:
    """Trilinear interpolation of ``volume`` (X, Y, Z, C) at voxel coordinates ``vox`` (..., 3).

    Differentiable with respect to both (gather + weighted sum).  Out-of-bounds points get zeros and
    ``inside = False``.  Weights are computed in ``vox``'s dtype and cast to ``volume``'s."""
    volume, vox = as_tensor(volume), as_tensor(vox)
    dims = volume.shape[:3]
    inside = inside_bounds(vox, dims)
    d = torch.as_tensor(dims, dtype=vox.dtype, device=vox.device)
    base = torch.floor(vox)
    frac = vox - base
    frac = torch.where((vox < 0) | (vox > d - 1), torch.zeros_like(frac), frac)
    base = base.long()
    flat = volume.reshape(-1, volume.shape[-1])
    # all 8 corners at once: offsets (8, 3) in (x, y, z) order, corner k = 4 ox + 2 oy + oz
    off = torch.tensor([[(k >> 2) & 1, (k >> 1) & 1, k & 1] for k in range(8)], device=vox.device)
    hi = torch.tensor([d - 1 for d in dims], device=vox.device)
    idx = torch.minimum((base.unsqueeze(-2) + off).clamp(min=0), hi)                 # (..., 8, 3)
    flat_idx = flat_index(idx[..., 0], idx[..., 1], idx[..., 2], dims)               # (..., 8)
    rows = flat[flat_idx.reshape(-1)].reshape(*vox.shape[:-1], 8, flat.shape[-1])     # (..., 8, C)
    one_minus = 1 - frac
    wsel = torch.where(off.bool(), frac.unsqueeze(-2), one_minus.unsqueeze(-2))        # (..., 8, 3)
    w = ((wsel[..., 0] * wsel[..., 1]) * wsel[..., 2]).to(volume.dtype)                # (..., 8)
    # MRtrix3 drops weights in (0, 1e-6): value and derivative of the implemented function (so autograd
    # matches finite differences).  A weight exactly 0 (a point on a voxel-centre plane) is kept as the
    # product it is, so its derivative -- the one-sided slope into the next cell -- is not lost.
    w = torch.where((w < WEIGHT_EPS) & (w != 0), torch.zeros_like(w), w)
    out = 0
    for corner in range(8):   # accumulate in corner order (fixed rounding, matches the reference)
        out = out + w[..., corner, None] * rows[..., corner, :]
    out = torch.where(inside.unsqueeze(-1), out, torch.zeros_like(out))
    return Sample(out, inside)


def nearest_value(volume: Tensor, vox: Tensor) -> Tensor:
    """Value of the nearest voxel (round half away from zero) of a 3-D ``volume`` (X, Y, Z), or 0 when the
    rounded index is out of bounds.  vox: (..., 3) -> (...,) of volume's dtype."""
    dims = volume.shape[:3]
    r = round_half_away(vox)
    d = torch.as_tensor(dims, dtype=vox.dtype, device=vox.device)
    ok = ((r >= 0) & (r <= d - 1)).all(-1)
    ri = r.long()
    idx = [ri[..., a].clamp(0, dims[a] - 1) for a in range(3)]
    vals = volume.reshape(-1)[flat_index(*idx, dims).reshape(-1)].reshape(vox.shape[:-1])
    return torch.where(ok, vals, torch.zeros_like(vals))


def sample_fod(sh_volume: Tensor, nonzero: Tensor, world_to_voxel: Tensor, pos: Tensor) -> Sample:
    """FOD coefficients at scanner points, MRtrix3 style.

    sh_volume: (X, Y, Z, N); nonzero: (X, Y, Z) bool, voxels with any non-zero coefficient;
    world_to_voxel: (4, 4); pos: (..., 3) scanner mm.  Voxel coordinates are computed in float64 (as
    MRtrix3 does), the weighted sum in ``sh_volume``'s dtype.  ``inside`` is False outside the image or
    where the nearest voxel is all-zero; ``values`` there are zeros."""
    sh_volume, nonzero, world_to_voxel, pos = map(as_tensor, (sh_volume, nonzero, world_to_voxel, pos))
    vox = to_voxel(pos, world_to_voxel.to(torch.float64))
    s = trilinear(sh_volume, vox)
    inside = s.inside & nearest_value(nonzero, vox)
    return Sample(torch.where(inside.unsqueeze(-1), s.values, torch.zeros_like(s.values)), inside)
