"""The grey matter - white matter interface of a five-tissue-type image (MRtrix3 ``5tt2gmwmi``), for seeding.

Each voxel's value is the magnitude of the tissue gradient across it: along each voxel axis, the central
difference (one-sided, undivided, at the image edges) of GM (cortical + sub-cortical) and of WM, the smaller of the
two absolute differences, and the root of the sum of their squares over the three axes.  Fractions are clamped to
[0, 1] and a voxel holding a NaN counts as empty, as MRtrix3 reads tissues.  The image's own grid; the result does
not depend on the order or direction of the voxel axes.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def gmwmi(tissues: np.ndarray, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """tissues: (X, Y, Z, 5) 5TT fractions -> (X, Y, Z) float32 GM-WM interface map (0 outside ``mask`` (X, Y, Z),
    when given)."""
    t = np.asarray(tissues, dtype=np.float32)
    t = np.where(np.isnan(t).any(-1, keepdims=True), np.float32(0), np.clip(t, 0, 1))
    gm, wm = t[..., 0] + t[..., 1], t[..., 2]
    total = np.zeros(gm.shape, dtype=np.float64)
    for axis in range(3):
        n = gm.shape[axis]
        i = np.arange(n)
        lo, hi = np.maximum(i - 1, 0), np.minimum(i + 1, n - 1)
        half = np.where((i == 0) | (i == n - 1), 1.0, 0.5).reshape([-1 if a == axis else 1 for a in range(3)])
        d = np.minimum(np.abs(np.take(gm, hi, axis) - np.take(gm, lo, axis)),
                       np.abs(np.take(wm, hi, axis) - np.take(wm, lo, axis)))
        total += (half * d.astype(np.float64)) ** 2
    out = np.sqrt(total).astype(np.float32)
    if mask is not None:
        out[np.asarray(mask) == 0] = 0
    return out
