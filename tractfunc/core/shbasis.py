"""Conversions between the real even-degree SH bases in use: MRtrix3 / DIPY ``tournier07`` (tractfunc's
native basis, :mod:`tractfunc.core.sh`), ``tournier07`` legacy (MRtrix 0.2), and DIPY's ``descoteaux07``
(non-legacy and legacy).

NumPy only (no torch import), so the file boundary (:func:`tractfunc.io.load_fod`) and the command line's
native route can convert without torch; a torch tensor given to :func:`convert` stays a torch tensor.

All four bases order coefficients the same way -- ``k = l(l+1)/2 + m`` for even ``l`` and ``-l <= m <= l``
-- and are built from the complex ``Y_l^m`` (Condon-Shortley phase, as ``scipy.special``).  Per ``(l, m)``,
with ``s = sqrt(2)`` (see docs/sh_bases.md for the derivation):

============================  =================  =======================  ==============================
basis                         ``m > 0``          ``m = 0``                ``m < 0``
============================  =================  =======================  ==============================
``mrtrix`` (== ``tournier07``) ``s Re Y_l^m``     ``Y_l^0``                ``s Im Y_l^|m|``
``tournier07_legacy``          ``Re Y_l^m``       ``Y_l^0``                ``Im Y_l^|m|``
``descoteaux07``               ``s Im Y_l^m``     ``Y_l^0``                ``s Re Y_l^m = (-1)^m s Re Y_l^|m|``
``descoteaux07_legacy``        ``s Im Y_l^m``     ``Y_l^0``                ``s Re Y_l^|m|``
============================  =================  =======================  ==============================

So every basis function is a native one times a sign/scale, possibly at ``-m``: ``Y^b_k = a_k Y^mrtrix_{p(k)}``
with ``p`` the identity (tournier07) or ``m -> -m`` (descoteaux07).  A series ``sum_k c_k Y^b_k`` then has
native coefficients ``c^mrtrix_{p(k)} = a_k c_k``; the inverse divides.  Directions are not touched: the
conversion assumes both series are expressed in the same direction frame (see docs/sh_bases.md).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .shsize import lmax_for

BASES = ("mrtrix", "tournier07", "tournier07_legacy", "descoteaux07", "descoteaux07_legacy")
NATIVE = "mrtrix"


def check_basis(name: str) -> str:
    """``name`` if it is one of :data:`BASES`, else ``ValueError`` naming the choices."""
    if name not in BASES:
        raise ValueError(f"unknown SH basis {name!r}; expected one of {', '.join(BASES)}")
    return name


@lru_cache(maxsize=None)
def _to_native(lmax: int, basis: str):
    """(perm (N,) int, scale (N,) float64): ``native[..., perm] = scale * coeffs`` for a series in ``basis``."""
    check_basis(basis)
    perm, scale = [], []
    for l in range(0, lmax + 1, 2):
        for m in range(-l, l + 1):
            k0 = l * (l + 1) // 2
            if basis in ("mrtrix", "tournier07"):
                p, a = m, 1.0
            elif basis == "tournier07_legacy":
                p, a = m, (1.0 if m == 0 else 1.0 / math.sqrt(2.0))
            elif m >= 0:                     # descoteaux07, m > 0: s Im Y_l^m = native at -m
                p, a = -m, 1.0
            else:                            # descoteaux07, m < 0: (+-) s Re Y_l^|m| = native at |m|
                p, a = -m, ((-1.0) ** m if basis == "descoteaux07" else 1.0)
            perm.append(k0 + p)
            scale.append(a)
    return np.array(perm), np.array(scale)


@lru_cache(maxsize=None)
def _plan(lmax: int, src: str, dst: str):
    """(index (N,), scale (N,)) with ``out = coeffs[..., index] * scale`` converting ``src`` -> ``dst``."""
    p_src, a_src = _to_native(lmax, src)
    p_dst, a_dst = _to_native(lmax, dst)
    n = len(p_src)
    # native from src: nat[p_src[k]] = a_src[k] c[k]  ->  nat[j] = a_src[q[j]] c[q[j]], q = inverse of p_src
    q = np.empty(n, dtype=np.int64)
    q[p_src] = np.arange(n)
    # dst from native: nat[p_dst[k]] = a_dst[k] d[k]  ->  d[k] = nat[p_dst[k]] / a_dst[k]
    index = q[p_dst]
    scale = a_src[index] / a_dst
    index.setflags(write=False)
    scale.setflags(write=False)
    return index, scale


def conversion_matrix(lmax: int, src: str, dst: str) -> np.ndarray:
    """(N, N) float64 matrix ``M`` with ``coeffs_dst = M @ coeffs_src`` (a signed, scaled permutation)."""
    index, scale = _plan(lmax, check_basis(src), check_basis(dst))
    M = np.zeros((len(index), len(index)))
    M[np.arange(len(index)), index] = scale
    return M


def convert(coeffs, src: str, dst: str = NATIVE):
    """SH coefficients ``(..., N)`` in basis ``src`` -> the same function's coefficients in basis ``dst``.

    Works on NumPy arrays (float32/float64 kept) and torch tensors (dtype/device kept, differentiable);
    returns a new array.  ``N`` must be ``(l+1)(l+2)/2`` for even ``l``."""
    index, scale = _plan(lmax_for(coeffs.shape[-1]), check_basis(src), check_basis(dst))
    if isinstance(coeffs, np.ndarray):
        return coeffs[..., index] * scale.astype(coeffs.dtype if coeffs.dtype.kind == "f" else np.float64)
    import torch  # only reached with a tensor, so torch is already loaded
    return coeffs[..., torch.tensor(index, device=coeffs.device)] * torch.tensor(
        scale, dtype=coeffs.dtype, device=coeffs.device)


def to_native(coeffs, basis: str):
    """Coefficients ``(..., N)`` in ``basis`` -> tractfunc's native (MRtrix3) basis."""
    return convert(coeffs, basis, NATIVE)


def from_native(coeffs, basis: str):
    """Native (MRtrix3) coefficients ``(..., N)`` -> ``basis``."""
    return convert(coeffs, NATIVE, basis)


def dipy_basis(basis_type=None, legacy: bool = True) -> str:
    """DIPY's ``(basis_type, legacy)`` pair -> a name of :data:`BASES`.

    basis_type: ``None`` or ``"descoteaux07"`` (DIPY's default), ``"tournier07"``, ``"mrtrix"`` (tournier07
    without legacy, whatever ``legacy`` says) or a full name of :data:`BASES`; legacy: DIPY's flag (default
    True, as DIPY's ``from_shcoeff``): ``descoteaux07`` legacy=True is ``descoteaux07_legacy``."""
    name = "descoteaux07" if basis_type is None else basis_type
    if name in ("descoteaux07", "tournier07") and legacy:
        name += "_legacy"
    return check_basis(name)
