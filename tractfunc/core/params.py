"""Tracking parameters and their tckgen defaults.

MRtrix3 derives every default from the FOD voxel size ``vox = (sx sy sz)^(1/3)`` and computes them in
single precision; we replay that arithmetic in float32 so vertex-count limits match ``tckgen`` exactly.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np

STEP_VOXELS = 0.1          # first order (Euler)
STEP_VOXELS_RK4 = 0.25
ANGLE_DEG = 60.0
CUTOFF = 0.1
MIN_LENGTH_VOXELS = 5.0
MIN_LENGTH_VOXELS_ACT = 2.0   # tckgen's default minimum length under -act
CUTOFF_ACT_FACTOR = 0.5       # tckgen's default cutoff is halved under -act
MAX_LENGTH_VOXELS = 100.0

f32 = np.float32


class TrackParams(NamedTuple):
    """Resolved parameters (plain Python numbers, so they are static under torch.compile).

    step: mm; cutoff: FOD amplitude; cos_angle_step: minimum dot product between consecutive peak
    directions inside one step (-1 disables it, as with RK4); cos_angle_rk4: minimum dot product between
    the first RK4 stage direction and the peak at the new point (RK4 only); max_points / min_points:
    vertex limits over both halves of a streamline; rk4: integration scheme; precomputed: emulate
    MRtrix3's Legendre lookup table in peak finding; max_length / min_length / angle: for headers;
    peak_polish: exact Newton iterations appended to each peak search (0 = tckgen; 3 gives the exact
    peak, for gradient checks against finite differences); state_dtype: see :func:`resolve`.  ``step`` is a
    number, or a 0-d tensor (``resolve(..., step=tensor)``) to differentiate with respect to it; the vertex
    limits stay fixed."""
    step: float
    cutoff: float
    cos_angle_step: float
    cos_angle_rk4: float
    max_points: int
    min_points: int
    rk4: bool
    precomputed: bool
    angle: float
    min_length: float
    max_length: float
    peak_polish: int = 0
    state_dtype: Optional[torch.dtype] = None


def _libm_f32(name: str, fallback):
    """The C library's single-precision ``name`` (``cosf``, ``sinf``, ``asinf``): tckgen calls these, and
    NumPy's float32 functions differ from them in the last bit for about one argument in five.  Falls
    back to ``fallback`` (NumPy) where no C math library can be loaded."""
    import ctypes
    import ctypes.util
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6"), name)
    except (OSError, AttributeError):
        return lambda x: f32(fallback(f32(x)))
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return lambda x: f32(fn(float(x)))


cosf, sinf, asinf = _libm_f32("cosf", np.cos), _libm_f32("sinf", np.sin), _libm_f32("asinf", np.arcsin)


def mean_voxel_size(voxel_sizes: Sequence[float]) -> float:
    """MRtrix3's ``vox()``: the geometric mean of the three voxel sizes (mm) as tckgen computes it (double
    product and power, rounded to float32)."""
    sx, sy, sz = (float(v) for v in voxel_sizes[:3])
    return float(f32(math.pow(sx * sy * sz, float(f32(1.0 / 3.0)))))


def min_chord(step: float, angle: float) -> np.float32:
    """tckgen's shortest possible step chord (mm, float32) for a step (mm) and a maximum angle (degrees): the chord
    of one step around the circle of minimum curvature radius; 0 when that circle is travelled whole in a step."""
    step, angle_rad = f32(step), f32(float(f32(angle)) * (math.pi / 180.0))
    min_radius = f32(step / (f32(2.0) * sinf(f32(f32(0.5) * angle_rad))))
    angle_minradius = f32(f32(2.0) * asinf(f32(step / (f32(2.0) * min_radius))))
    return f32(0.0) if angle_minradius > f32(2.0 * math.pi) else \
        f32(f32(2.0) * min_radius * sinf(f32(f32(0.5) * angle_minradius)))


def measured_points(params: "TrackParams") -> tuple:
    """(n_min, n_max): tckgen's vertex counts beyond which an accepted streamline needs no length measurement after
    its end points moved (``-crop_at_gmwmi``): one of at most n_min or at least n_max vertices is measured against
    ``params.min_length`` / ``max_length``."""
    step = float(params.step)
    ms = min_chord(step, params.angle)
    n_min = 3 + int(math.ceil(f32(f32(params.min_length) / ms))) if ms else 2 ** 62
    n_max = 1 + int(math.floor(f32(f32(params.max_length) / f32(step))))
    return min(n_min, 2 ** 62), min(n_max, 2 ** 62)


def resolve(voxel_sizes: Sequence[float], *, rk4: bool = False, step: Optional[float] = None,
            angle: Optional[float] = None, cutoff: Optional[float] = None,
            min_length: Optional[float] = None, max_length: Optional[float] = None,
            precomputed: Optional[bool] = None, peak_polish: Optional[int] = None,
            state_dtype: Optional[torch.dtype] = None, exact: bool = False, act: bool = False) -> TrackParams:
    """Fill unspecified parameters with tckgen SD_Stream defaults for an FOD of the given voxel sizes.

    Args:
        voxel_sizes: (3,) mm.
        rk4: tckgen's ``-rk4`` scheme.
        step, min_length, max_length: mm; None for tckgen's defaults from the voxel size.  ``step`` may be a
            0-d tensor, to differentiate with respect to it (the vertex limits are computed from its value and
            stay fixed).
        angle: degrees; cutoff: FOD amplitude.
        precomputed: tckgen's Legendre lookup table in the peak search (default True, unless ``exact``).
        peak_polish: exact Newton iterations appended to each peak search (default 0, unless ``exact``).
        state_dtype: round the PyTorch engines' state to this dtype between operations (torch.float32 keeps
            tckgen's float32 rounding under float64 arithmetic); None keeps the computation's dtype.
        exact: the settings for gradients: exact SH (``precomputed=False``) and exact peaks
            (``peak_polish=3``), so that the forward is the exact maximum and autograd matches finite
            differences. tckgen's settings (False) are the default.
        act: tckgen's defaults under ``-act``: the cutoff halved (0.05) and a 2-voxel minimum length.
    Returns:
        :class:`TrackParams`.
    Raises:
        ValueError: non-positive step, angle outside (0, 180], negative lengths or cutoff.
    """
    precomputed = (not exact) if precomputed is None else precomputed
    peak_polish = (3 if exact else 0) if peak_polish is None else peak_polish
    step_tensor = None
    if step is not None and not isinstance(step, (int, float, np.floating, np.integer)):
        import torch
        if torch.is_tensor(step):
            step_tensor, step = step, float(step.detach())
    vox = mean_voxel_size(voxel_sizes)
    step = f32(step) if step is not None else f32(f32(STEP_VOXELS_RK4 if rk4 else STEP_VOXELS) * f32(vox))
    angle = f32(ANGLE_DEG if angle is None else angle)
    cutoff = f32(cutoff) if cutoff is not None else f32(float(f32(CUTOFF)) * (CUTOFF_ACT_FACTOR if act else 1.0))
    max_dist = f32(max_length) if max_length is not None else f32(f32(MAX_LENGTH_VOXELS) * f32(vox))
    min_dist = f32(min_length) if min_length is not None else \
        f32(f32(MIN_LENGTH_VOXELS_ACT if act else MIN_LENGTH_VOXELS) * f32(vox))
    if not (np.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive number of mm, got {step}")
    if not (0 < angle <= 180):   # NaN fails too
        raise ValueError(f"angle must be in (0, 180] degrees, got {angle}")
    if not (np.isfinite(cutoff) and cutoff >= 0):
        raise ValueError(f"cutoff must be a non-negative FOD amplitude, got {cutoff}")
    if not (isinstance(peak_polish, int) and peak_polish >= 0):
        raise ValueError(f"peak_polish must be a non-negative integer, got {peak_polish!r}")
    if state_dtype is not None:
        import torch   # only here: resolving parameters does not need torch otherwise
        if state_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"state_dtype must be None, torch.float32 or torch.float64, got {state_dtype!r}")
    if not (np.isfinite(min_dist) and np.isfinite(max_dist) and min_dist >= 0 and max_dist > 0):
        raise ValueError(f"lengths must be finite and non-negative (max > 0) mm, got min {min_dist}, max {max_dist}")
    cos_angle = cosf(f32(float(angle) * (math.pi / 180.0)))
    min_step = min_chord(step, angle)
    max_points = (3 + int(math.ceil(f32(max_dist / min_step)))) if min_step else 2 ** 62
    min_points = 1 + int(math.ceil(f32(min_dist / step)))
    # int64 in the kernels: a budget beyond 2^62 vertices is no limit at all (memory follows the streamlines)
    max_points, min_points = min(max_points, 2 ** 62), min(min_points, 2 ** 62)
    return TrackParams(
        step=float(step) if step_tensor is None else step_tensor, cutoff=float(cutoff),
        cos_angle_step=-1.0 if rk4 else float(cos_angle),
        cos_angle_rk4=float(cos_angle) if rk4 else -1.0,
        max_points=max_points, min_points=min_points, rk4=bool(rk4), precomputed=bool(precomputed),
        angle=float(angle), min_length=float(min_dist), max_length=float(max_dist),
        peak_polish=int(peak_polish), state_dtype=state_dtype)
