"""MRtrix3's realigned voxel frame: the axis permutation and flips that bring an image's transform closest to
RAS (``Header::realign_transform``, applied when MRtrix3 opens an image), and the scanner -> voxel transform
in that frame with Eigen's arithmetic (cofactor inverse), so that float32 voxel coordinates computed from it
match tckgen's and tckmap's to the last bit. NumPy only (the native tracking path imports no torch).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


def realign(affine: np.ndarray) -> Tuple[list, list]:
    """MRtrix3's axis permutation and flips that bring a voxel->scanner affine closest to RAS.

    affine: (4, 4) voxel -> scanner.  Returns (perm, flip): new axis i is old axis perm[i], read backwards when
    flip[perm[i]]."""
    M = np.asarray(affine, dtype=np.float64)[:3, :3]
    M = M / np.linalg.norm(M, axis=0)   # MRtrix3 decides on the direction cosines, not the voxel sizes
    perm = [int(np.argmax(np.abs(M[i]))) for i in range(3)]

    def other(a, b):
        return next(i for i in range(3) if i not in (a, b))

    if perm[0] == perm[1]:
        perm[1] = other(perm[0], perm[2])
    if perm[0] == perm[2]:
        perm[2] = other(perm[0], perm[1])
    if perm[1] == perm[2]:
        perm[2] = other(perm[0], perm[1])
    flip = [False] * 3
    for i in range(3):
        flip[perm[i]] = bool(M[i, perm[i]] < 0)
    return perm, flip


def inverse_affine(B: np.ndarray) -> np.ndarray:
    """Inverse of a (3, 4) affine as Eigen computes it (cofactors times the reciprocal determinant;
    translation -L^-1 t), so the scanner->voxel transform matches tckgen's to the last bit."""
    m = B[:, :3]

    def cof(i, j):
        i1, i2, j1, j2 = (i + 1) % 3, (i + 2) % 3, (j + 1) % 3, (j + 2) % 3
        return m[i1, j1] * m[i2, j2] - m[i1, j2] * m[i2, j1]

    c0 = [cof(0, 0), cof(1, 0), cof(2, 0)]
    det = (c0[0] * m[0, 0] + c0[1] * m[1, 0]) + c0[2] * m[2, 0]
    invdet = 1.0 / det
    L = np.empty((3, 3))
    L[0] = [c * invdet for c in c0]
    for i in range(1, 3):
        for j in range(3):
            L[i, j] = cof(j, i) * invdet
    out = np.empty((3, 4))
    out[:, :3] = L
    t = B[:, 3]
    for i in range(3):
        out[i, 3] = -((L[i, 0] * t[0] + L[i, 1] * t[1]) + L[i, 2] * t[2])
    return out


def frame(affine: np.ndarray, dims, strides, voxel_sizes=None) -> Tuple[np.ndarray, list, list, int]:
    """Scanner->voxel transform (3, 4) in MRtrix3's realigned frame, as tckgen computes it from the
    image's voxel->scanner affine (4, 4) and header voxel sizes (3,) (None: the affine's column lengths);
    the element strides of the frame's axes in an array with ``strides`` along the original axes; the
    frame's dims; and the element offset of its origin."""
    A = np.asarray(affine, dtype=np.float64)
    perm, flip = realign(A)
    M = A[:3].copy()
    norms = [float(np.sqrt((M[0, j] * M[0, j] + M[1, j] * M[1, j]) + M[2, j] * M[2, j])) for j in range(3)]
    spacing = norms if voxel_sizes is None else [float(v) for v in voxel_sizes]
    for j in range(3):
        M[:, j] = M[:, j] / norms[j]   # direction cosines, then scaled by the header's voxel sizes
    offset = 0
    st = list(strides)
    for a in range(3):
        if flip[a]:
            length = (dims[a] - 1) * spacing[a]
            for n in range(3):
                M[n, a] = -M[n, a]
                M[n, 3] -= length * M[n, a]
            offset += (dims[a] - 1) * st[a]
            st[a] = -st[a]
    M[:, :3] = M[:, perm]
    sp = [spacing[p] for p in perm]
    V = M.copy()
    for j in range(3):
        V[:, j] = M[:, j] * sp[j]
    return inverse_affine(V), [int(dims[p]) for p in perm], [int(st[p]) for p in perm], offset
