"""A synthetic FOD phantom the package generates itself: two curved/straight bundles crossing on an
oblique grid (no fibre exactly along an image or scanner axis, as MRtrix3's (el, az) peak search needs).

Fibre orientation distributions are sums of sharp axially-symmetric lobes projected onto the MRtrix3 SH
basis (lmax 8) by least squares on a dense sphere grid.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..core import sh
from ..core.sphere import fibonacci_sphere


class Phantom(NamedTuple):
    """fod: (X, Y, Z, 45) float32 SH coefficients; affine: (4, 4) voxel -> scanner mm;
    mask: (X, Y, Z) bool brain mask; seed_mask: (X, Y, Z) bool region to seed from."""
    fod: np.ndarray
    affine: np.ndarray
    mask: np.ndarray
    seed_mask: np.ndarray


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def make_phantom(shape=(40, 40, 16), voxel=2.0, lmax=8, kappa=6.0) -> Phantom:
    """Build the phantom.  Bundle A arcs (radius 0.7 x width) in the image x-y plane; bundle B runs straight
    along the image diagonal, crossing A near the centre.  The grid is rotated obliquely in scanner space."""
    X, Y, Z = shape
    ii, jj, kk = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    cx, cy = 0.0, 0.0
    R = 0.7 * X
    r = np.hypot(ii - cx, jj - cy)
    arc = (np.abs(r - R) < 4.5) & (kk > 2) & (kk < Z - 3)
    tang = np.stack([-(jj - cy), ii - cx, 0.3 * np.ones_like(r)], -1) / np.maximum(r, 1e-6)[..., None]
    tang /= np.linalg.norm(tang, axis=-1, keepdims=True)
    diag = np.array([1.0, -1.0, 0.15]) / np.linalg.norm([1.0, -1.0, 0.15])
    d_line = np.abs((ii - X / 2) + (jj - Y / 2)) / math.sqrt(2)
    line = (d_line < 4.0) & (kk > 2) & (kk < Z - 3)
    rot = _rotation(0.21, -0.17, 0.33)
    dirs = fibonacci_sphere(2000).numpy()
    B = sh.basis(torch.as_tensor(dirs), lmax).numpy()
    pinv = np.linalg.pinv(B)
    amp = np.zeros(shape + (dirs.shape[0],))
    for present, d in ((arc, tang), (line, np.broadcast_to(diag, tang.shape))):
        dw = d @ rot.T   # fibre directions in scanner space
        lobe = np.exp(-kappa * (1 - (dw @ dirs.T) ** 2))
        amp += present[..., None] * lobe
    fod = (amp.reshape(-1, dirs.shape[0]) @ pinv.T).reshape(shape + (B.shape[1],)).astype(np.float32)
    mask = arc | line
    affine = np.eye(4)
    affine[:3, :3] = rot * voxel
    affine[:3, 3] = -rot @ (np.array(shape) * voxel / 2)
    fod[~mask] = 0
    return Phantom(fod, affine, mask, mask.copy())


def save_phantom(ph: Phantom, prefix: str) -> dict:
    """Write ``prefix_fod.nii.gz``, ``prefix_mask.nii.gz`` and return their paths."""
    import nibabel as nib
    paths = {"fod": prefix + "_fod.nii.gz", "mask": prefix + "_mask.nii.gz"}
    from ..io.atomic import atomic_path
    with atomic_path(paths["fod"]) as tmp:
        nib.save(nib.Nifti1Image(ph.fod, ph.affine), tmp)
    with atomic_path(paths["mask"]) as tmp:
        nib.save(nib.Nifti1Image(ph.mask.astype(np.uint8), ph.affine), tmp)
    return paths
