"""A template grid and MRtrix3's scanner -> voxel rule for mapping streamlines onto it.

MRtrix3 loads an image with its axes permuted and flipped so that the transform is near-axial
(``Header::realign_transform``: for the usual LAS NIfTI, the x axis is flipped), computes
``scanner2voxel`` in double in that frame, casts it to float32 and applies it to float32 vertices; a vertex
belongs to the voxel ``std::round`` (half away from zero) of that float32 coordinate. :func:`realigned_coords`
repeats those operations in the same order, so the voxel a vertex lands in is tckmap's, bit for bit, and
:func:`unalign` maps the index back to the file's own axes (the layout nibabel reads, which is the one tckmap
writes).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core import frames
from ..core.arrays import as_tensor
from ..core.frames import realign
from ..errors import TractfuncError

Tensor = torch.Tensor


class Grid(NamedTuple):
    """A voxel grid. affine: (4, 4) float64 NumPy voxel -> scanner mm (the file's axes); dims: (X, Y, Z);
    spacing: (3,) mm voxel sizes (MRtrix3 takes the header's pixdim; default the affine's column norms)."""
    affine: np.ndarray
    dims: Tuple[int, int, int]
    spacing: Tuple[float, float, float]

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.dims))


def make_grid(affine, dims: Sequence[int], spacing: Optional[Sequence[float]] = None) -> Grid:
    """Check and pack a template grid. affine: (4, 4) voxel -> scanner mm (array or tensor); dims: the first three
    sizes of the image; spacing: (3,) mm, default the affine's column norms. Raises TractfuncError."""
    A = np.asarray(as_tensor(affine).detach().cpu().double().numpy() if isinstance(affine, Tensor)
                   else affine, dtype=np.float64)
    if A.shape != (4, 4) or not np.all(np.isfinite(A)) or abs(np.linalg.det(A[:3, :3])) < 1e-12:
        raise TractfuncError(f"template affine {A.shape}: expected an invertible (4, 4) voxel-to-scanner matrix")
    dims = tuple(int(d) for d in tuple(dims)[:3])
    if len(dims) != 3 or min(dims) < 1:
        raise TractfuncError(f"template dims {dims}: expected three positive sizes")
    norms = np.sqrt((A[:3, :3] ** 2).sum(0))
    sp = tuple(float(s) for s in (norms if spacing is None else spacing))
    if len(sp) != 3 or not all(np.isfinite(sp)) or min(sp) <= 0:
        raise TractfuncError(f"template spacing {sp}: expected three positive voxel sizes in mm")
    return Grid(A, dims, sp)


class Frame(NamedTuple):
    """MRtrix3's realigned voxel frame of a grid. s2v: (3, 4) float32 scanner -> realigned voxel; perm: realigned
    axis i is file axis perm[i]; flip: (3,) bool per file axis, reversed in the realigned frame."""
    s2v: np.ndarray
    perm: Tuple[int, int, int]
    flip: Tuple[bool, bool, bool]


def frame(grid: Grid) -> Frame:
    """The realigned frame and float32 scanner -> voxel transform tckmap uses for ``grid``
    (:func:`tractfunc.core.frames.frame`, cast to float32 as MRtrix3's mapper does)."""
    perm, flip = realign(grid.affine)
    s2v = frames.frame(grid.affine, grid.dims, (1, 1, 1), grid.spacing)[0]
    return Frame(s2v.astype(np.float32), tuple(perm), tuple(flip))


def realigned_coords(pos: Tensor, fr: Frame) -> Tensor:
    """Scanner mm (..., 3) -> float32 realigned voxel coordinates (..., 3), in tckmap's operation order."""
    M = torch.as_tensor(fr.s2v, device=pos.device)
    p = pos.to(torch.float32)
    x, y, z = p[..., 0:1], p[..., 1:2], p[..., 2:3]
    return ((M[:, 0] * x + M[:, 1] * y) + M[:, 2] * z) + M[:, 3]


def unalign(idx: Tensor, grid: Grid, fr: Frame) -> Tensor:
    """Integer realigned voxel indices (..., 3) -> the file's axes (..., 3) (undo the permutation and flips)."""
    out = torch.empty_like(idx)
    for i in range(3):
        a = fr.perm[i]
        out[..., a] = (grid.dims[a] - 1 - idx[..., i]) if fr.flip[a] else idx[..., i]
    return out


def realigned_dims(grid: Grid, fr: Frame) -> Tuple[int, int, int]:
    return tuple(grid.dims[a] for a in fr.perm)
