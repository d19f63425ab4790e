"""Size of an even-degree real SH series (MRtrix3 / DIPY ``tournier07`` layout); no torch, so the file
boundary (:mod:`tractfunc.io`) and the native tracker can check coefficient counts without it."""
from __future__ import annotations

import math


def n_coeffs(lmax: int) -> int:
    """Number of even-degree SH coefficients up to ``lmax``: ``(lmax+1)(lmax+2)/2``."""
    return (lmax + 1) * (lmax + 2) // 2


def lmax_for(n: int) -> int:
    """Inverse of :func:`n_coeffs`; raises ``ValueError`` when ``n`` is not a valid even-l count."""
    lmax = int(round((math.sqrt(8 * n + 1) - 3) / 2))
    if lmax < 0 or lmax % 2 or n_coeffs(lmax) != n:
        raise ValueError(
            f"{n} coefficients is not an even-degree SH series: expected (l+1)(l+2)/2 for even l "
            f"(1, 6, 15, 28, 45, 66, 91, ...)"
        )
    return lmax
