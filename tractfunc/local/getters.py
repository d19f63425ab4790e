"""DIPY-family direction getters on a discrete sphere: closest peak and deterministic maximum, batched.

A *direction getter* is a callable

    getter(pos_vox: (B, 3), prev_dir: (B, 3), generator: Optional[torch.Generator]) -> (new_dir (B, 3), ok (B,))

built by a factory from an SH field and parameters.  ``pos_vox`` is in voxel coordinates (voxel centres on
integers, DIPY's tracking frame); directions are unit vectors in the frame of the array axes, as DIPY reads
them (the tracker steps ``pos += dir / voxel_size * step``).  ``ok`` is False where DIPY's getter returns
1 (no direction: the streamline ends there).  ``getter.initial_directions(pos_vox)`` gives the
:class:`tractfunc.local.peaks.Peaks` DIPY starts streamlines from at a seed.  Deterministic getters ignore the
generator; probabilistic ones (same signature) draw from it.

The PMF (DIPY ``SHCoeffPmfGen``): SH coefficients interpolated trilinearly in voxel space with DIPY's rule
(:func:`trilinear_dipy`), then evaluated on the sphere's vertices; zero outside the image.  The coefficients'
basis is named as DIPY names it, ``sh_basis`` (``basis_type``) with ``legacy``, and DIPY's default is
tractfunc's: ``"descoteaux07"``, ``legacy=True``; an MRtrix3 FOD (what :func:`tractfunc.io.load_fod`
returns) is ``sh_basis="tournier07", legacy=False`` (or ``"mrtrix"``).  The field stores them converted to
the MRtrix3 basis (:mod:`tractfunc.core.shbasis`; differentiable).  The sphere may be a DIPY ``Sphere`` /
``HemiSphere`` object, a DIPY sphere name or a :class:`tractfunc.local.peaks.Sphere`
(:func:`tractfunc.local.peaks.as_sphere`).

The frame of the SH's directions, ``sh_frame``: ``"voxel"`` (the default, :data:`DEFAULT_SH_FRAME`, for
the API and the command line alike) is DIPY's reading, the array axes, so DIPY code gives DIPY's
streamlines; ``"scanner"`` (with the affine) is the frame MRtrix3 stores FODs in, which differs from the
array axes on a mirrored (e.g. LAS) or oblique grid.  DIPY's ``pmf_threshold``: values below ``pmf_threshold`` times
the PMF's maximum (negative values included) are set to 0 before any choice.

* :func:`closest_peak` (``ClosestPeakDirectionGetter``): the PMF's peaks (``tractfunc.local.peaks``, DIPY's
  ``peak_directions`` with ``relative_peak_threshold`` and ``min_separation_angle``); the peak with the
  largest ``|cos|`` to ``prev_dir`` is taken, flipped to point forward, if that ``|cos| >= cos(max_angle)``.
* :func:`deterministic_maximum` (``DeterministicMaximumDirectionGetter``): the vertex of largest PMF
  among those with ``|cos| > cos(max_angle)`` to ``prev_dir`` (strict; the first vertex wins ties), flipped
  forward; none with a positive PMF -> not ok.

Gradients.  Both choose a sphere vertex, a piecewise-constant function of the inputs: in ``mode="hard"``
(the default, DIPY's forward exactly) the new direction carries no gradient, and gradients reach positions
only through the step (``pos + dir / voxel_size * step``: seeds, step size).  The deterministic maximum
offers two relaxations over the vertices in the cone, with weights ``softmax(pmf / (temperature * max))``
(``max``: the largest PMF in the cone, so the temperature is relative; rows without a candidate get no
weight):

* ``mode="soft"``: the new direction *is* the normalised weighted mean of the (forward-flipped) vertices;
  forward values change (``temperature -> 0`` recovers hard); gradients flow to the SH coefficients and to
  the position (through the trilinear weights), none to ``prev_dir`` directly (the cone, the forward flip
  and ``pmf_threshold`` are hard masks); autograd gives the soft forward's exact derivative wherever those
  masks do not switch (checked against finite differences through whole streamlines);
* ``mode="straight_through"``: forward = hard (DIPY's streamline), backward = the soft mode's derivative.

The closest-peak getter is hard only (its peak is a vertex chosen by comparisons; no gradient).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..core import sh as _sh
from ..core.arrays import as_tensor
from ..core import shbasis as _shbasis
from ..errors import TractfuncError
from .peaks import Peaks, Sphere, as_sphere, peak_directions

Tensor = torch.Tensor


# -- the PMF field ---------------------------------------------------------------------------------------

DEFAULT_SH_FRAME = "voxel"   # DIPY's reading of SH directions (the array axes); API and CLI default


class PmfField(NamedTuple):
    """sh: (X, Y, Z, N) SH coefficients (MRtrix3 basis), or (X, Y, Z, V) PMF values on the vertices when
    ``basis`` is None (DIPY ``SimplePmfGen``); basis: (V, N) basis values at the sphere's vertices (in the
    SH's frame) or None; sphere: the sphere, vertices (V, 3) in the array-axis (tracking) frame, in sh's
    dtype/device; affine: the (4, 4) float64 NumPy affine the field was given, or None."""
    sh: Tensor
    basis: Optional[Tensor]
    sphere: Sphere
    affine: Optional[np.ndarray] = None


def _as_affine(affine) -> Optional[np.ndarray]:
    if affine is None:
        return None
    A = np.asarray(affine, dtype=np.float64)
    if A.shape != (4, 4):
        raise TractfuncError(f"affine has shape {A.shape}; expected (4, 4)")
    return A


def make_pmf_field(sh_volume: Tensor, sphere=None, affine=None, sh_frame: str = DEFAULT_SH_FRAME,
                   sh_basis: Optional[str] = "descoteaux07", legacy: bool = True) -> PmfField:
    """SH volume (X, Y, Z, N) -> :class:`PmfField` on ``sphere`` (default: DIPY's ``default_sphere``).

    sh_basis/legacy: the coefficients' basis as DIPY names it (``basis_type``; None = ``"descoteaux07"``;
    see :func:`tractfunc.core.shbasis.dipy_basis`); converted to the MRtrix3 basis here.  sphere: see
    :func:`tractfunc.local.peaks.as_sphere`.  sh_frame: ``"voxel"`` (DIPY: the SH's directions are read in
    the array axes) or ``"scanner"`` (the SH's directions are scanner-frame, as MRtrix3 stores FODs; vertex
    ``v`` is evaluated at ``R v`` with ``R`` the rotation of ``affine`` (4, 4), so tracking follows the
    anatomy on a flipped or rotated grid)."""
    if sh_volume.dim() != 4:
        raise TractfuncError(f"SH volume has shape {tuple(sh_volume.shape)}; expected (X, Y, Z, N)")
    lmax = _sh.lmax_for(sh_volume.shape[-1])
    try:
        basis_name = _shbasis.dipy_basis(sh_basis, legacy)
    except ValueError as e:
        raise TractfuncError(str(e)) from None
    A = _as_affine(affine)
    sphere = as_sphere("default" if sphere is None else sphere)
    sphere = sphere.to(device=sh_volume.device, dtype=sh_volume.dtype)
    dirs = sphere.vertices
    if sh_frame == "scanner":
        if A is None:
            raise TractfuncError("sh_frame='scanner' needs the (4, 4) affine")
        lin = torch.as_tensor(A[:3, :3])
        rot = (lin / torch.linalg.vector_norm(lin, dim=0)).to(dirs)
        dirs = dirs @ rot.T
    elif sh_frame != "voxel":
        raise TractfuncError(f"sh_frame must be 'voxel' or 'scanner', got {sh_frame!r}")
    sh = _shbasis.to_native(sh_volume, basis_name) if basis_name not in ("mrtrix", "tournier07") else sh_volume
    return PmfField(sh.contiguous(), _sh.basis(dirs, lmax), sphere, A)


def make_sf_field(sf_volume: Tensor, sphere, affine=None) -> PmfField:
    """PMF values on the sphere's vertices (X, Y, Z, V) -> :class:`PmfField` (DIPY ``SimplePmfGen``:
    the values are interpolated with DIPY's trilinear rule, no SH).  sphere: required (the one ``sf`` was
    sampled on, vertices in the array-axis frame); see :func:`tractfunc.local.peaks.as_sphere`."""
    if sf_volume.dim() != 4:
        raise TractfuncError(f"SF volume has shape {tuple(sf_volume.shape)}; expected (X, Y, Z, V)")
    if sphere is None:
        raise TractfuncError("an SF (PMF on a sphere) needs the sphere it was sampled on")
    sphere = as_sphere(sphere).to(device=sf_volume.device, dtype=sf_volume.dtype)
    if sf_volume.shape[-1] != sphere.vertices.shape[0]:
        raise TractfuncError(f"SF has {sf_volume.shape[-1]} values per voxel; expected one per sphere vertex "
                             f"({sphere.vertices.shape[0]})")
    return PmfField(sf_volume.contiguous(), None, sphere, _as_affine(affine))


def trilinear_dipy(volume: Tensor, vox: Tensor):
    """DIPY's ``trilinear_interpolate4d``: volume (X, Y, Z, C) at voxel coords vox (..., 3) ->
    (values (..., C), inside (...,) bool).

    Outside when any coordinate is ``< -0.5`` or ``>= dim - 0.5`` (values 0 there); the 8 corners are
    clamped to the array (constant extrapolation over the outer half voxel) with weights ``1 - frac``,
    ``frac``; summed in DIPY's corner order.  (MRtrix3's rule, :func:`tractfunc.core.interpolate.trilinear`,
    differs: open interval and tiny weights dropped.)  Differentiable in volume and vox."""
    dims = volume.shape[:3]
    hi = torch.as_tensor(dims, dtype=vox.dtype, device=vox.device)
    inside = ((vox >= -0.5) & (vox < hi - 0.5)).all(-1)
    base = torch.floor(vox)
    frac = vox - base
    b = base.long()
    top = torch.as_tensor([d - 1 for d in dims], device=vox.device)
    lo_idx = torch.minimum(b.clamp(min=0), top).unsqueeze(-2)                # (..., 1, 3)
    hi_idx = torch.minimum((b + 1).clamp(min=0), top).unsqueeze(-2)
    # corner c = 4 i + 2 j + k takes the upper neighbour along x if i, y if j, z if k (DIPY's loop order)
    off = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)], device=vox.device).bool()
    idx = torch.where(off, hi_idx, lo_idx)                                    # (..., 8, 3)
    w3 = torch.where(off, frac.unsqueeze(-2), (1 - frac).unsqueeze(-2))
    wt = (w3[..., 0] * w3[..., 1] * w3[..., 2]).to(volume.dtype)              # (..., 8)
    flat = volume.reshape(-1, volume.shape[-1])
    rows = flat[(idx[..., 0] * dims[1] + idx[..., 1]) * dims[2] + idx[..., 2]]   # (..., 8, C)
    out = 0
    for c in range(8):   # accumulated in DIPY's corner order
        out = out + wt[..., c, None] * rows[..., c, :]
    out = torch.where(inside.unsqueeze(-1), out, torch.zeros_like(out))
    return out, inside


def pmf_at(field: PmfField, pos_vox: Tensor) -> Tensor:
    """PMF (B, V) at voxel positions (B, 3): interpolated coefficients times the basis (0 outside)."""
    coeffs, _ = trilinear_dipy(field.sh, pos_vox.to(field.sh.dtype))
    return coeffs if field.basis is None else coeffs @ field.basis.T


def threshold_pmf(pmf: Tensor, pmf_threshold: float) -> Tensor:
    """DIPY's ``_get_pmf``: zero the values below ``pmf_threshold * max(max(pmf), 0)`` (all negatives)."""
    top = pmf.max(-1, keepdim=True).values.clamp(min=0)
    return torch.where(pmf < pmf_threshold * top, torch.zeros_like(pmf), pmf)


def forward_flip(v: Tensor, d: Tensor) -> Tensor:
    """v (..., 3) flipped to ``dot(d, v) > 0`` (DIPY: ``-v`` unless the dot is positive)."""
    s = (v * d).sum(-1, keepdim=True)
    return torch.where(s > 0, v, -v)


def unit_nonzero(v: Tensor) -> tuple[Tensor, Tensor]:
    """(v / |v|, |v| > 0) with a guarded norm (finite gradients where |v| = 0)."""
    n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    ok = n > 0
    return v / torch.where(ok, n, torch.ones_like(n)), ok.squeeze(-1)


# -- getters ---------------------------------------------------------------------------------------------

class PmfGetter:
    """Shared part of the PMF-based getters (DIPY ``BasePmfDirectionGetter``): the thresholded PMF and
    the initial directions at seeds.  Subclasses implement ``__call__(pos_vox, prev_dir, generator)``."""

    def __init__(self, field: PmfField, max_angle: float, pmf_threshold: float,
                 relative_peak_threshold: float, min_separation_angle: float, max_peaks: int):
        if not 0 <= max_angle <= 180:
            raise ValueError(f"max_angle must be in [0, 180] degrees, got {max_angle}")
        if pmf_threshold < 0:
            raise ValueError(f"pmf_threshold must be >= 0, got {pmf_threshold}")
        if max_peaks < 1:
            raise ValueError(f"max_peaks must be >= 1, got {max_peaks}")
        self.field = field
        self.max_angle = float(max_angle)
        self.cos_similarity = math.cos(math.radians(max_angle))
        self.pmf_threshold = float(pmf_threshold)
        self.relative_peak_threshold = float(relative_peak_threshold)
        self.min_separation_angle = float(min_separation_angle)
        self.max_peaks = int(max_peaks)

    @property
    def vertices(self) -> Tensor:
        return self.field.sphere.vertices

    def pmf(self, pos_vox: Tensor) -> Tensor:
        """Thresholded PMF (B, V) at voxel positions (B, 3)."""
        return threshold_pmf(pmf_at(self.field, pos_vox), self.pmf_threshold)

    def peaks(self, pmf: Tensor) -> Peaks:
        return peak_directions(pmf, self.field.sphere, self.relative_peak_threshold, self.min_separation_angle,
                               self.max_peaks)

    def initial_directions(self, pos_vox: Tensor) -> Peaks:
        """DIPY ``initial_direction``: the thresholded PMF's peaks at seeds (B, 3) -> Peaks (B, K)."""
        return self.peaks(self.pmf(pos_vox))


class ClosestPeakGetter(PmfGetter):
    """DIPY ``ClosestPeakDirectionGetter`` (see the module docstring).  Hard only."""

    def __call__(self, pos_vox: Tensor, prev_dir: Tensor, generator: Optional[torch.Generator] = None):
        pk = self.peaks(self.pmf(pos_vox))
        dots = (pk.dirs * prev_dir.unsqueeze(-2)).sum(-1)                      # (B, K)
        key = torch.where(pk.valid, dots.abs(), torch.full_like(dots, -1.0))
        best = key.argmax(-1, keepdim=True)                                   # first of equal |cos|
        dot = torch.gather(dots, -1, best).squeeze(-1)
        found = torch.gather(key, -1, best).squeeze(-1) > 0
        peak = torch.gather(pk.dirs, -2, best.unsqueeze(-1).expand(-1, 1, 3)).squeeze(-2)
        fwd, bwd = dot >= self.cos_similarity, dot <= -self.cos_similarity
        ok = found & (fwd | bwd)
        new = torch.where(fwd.unsqueeze(-1), peak, -peak)
        return torch.where(ok.unsqueeze(-1), new, prev_dir), ok


class DeterministicMaximumGetter(PmfGetter):
    """DIPY ``DeterministicMaximumDirectionGetter`` (see the module docstring for ``mode``)."""

    def __init__(self, *args, mode: str = "hard", temperature: float = 0.05, **kw):
        super().__init__(*args, **kw)
        if mode not in ("hard", "straight_through", "soft"):
            raise ValueError(f"mode must be 'hard', 'straight_through' or 'soft', got {mode!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.mode = mode
        self.temperature = float(temperature)

    def __call__(self, pos_vox: Tensor, prev_dir: Tensor, generator: Optional[torch.Generator] = None):
        pmf = self.pmf(pos_vox)
        d, nonzero = unit_nonzero(prev_dir.to(pmf.dtype))
        verts = self.vertices
        cos = (d @ verts.T).abs()                                              # (B, V)
        cand = (cos > self.cos_similarity) & (pmf > 0)
        key = torch.where(cand, pmf, torch.zeros_like(pmf))
        best = key.argmax(-1)                                                 # first maximum
        ok = (torch.gather(key, -1, best[:, None]).squeeze(-1) > 0) & nonzero
        hard = forward_flip(verts[best], d)
        if self.mode != "hard":
            soft = self._soft(pmf, key, cand, d)
            new = soft if self.mode == "soft" else hard + (soft - soft.detach())
        else:
            new = hard
        return torch.where(ok.unsqueeze(-1), new, prev_dir.to(new.dtype)), ok

    def _soft(self, pmf: Tensor, key: Tensor, cand: Tensor, d: Tensor) -> Tensor:
        """Softmax-weighted mean of the forward-flipped candidate vertices (B, 3), unit."""
        any_c = cand.any(-1, keepdim=True)
        scale = key.max(-1, keepdim=True).values
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)) * self.temperature
        logits = torch.where(cand, pmf / scale, torch.full_like(pmf, -math.inf))
        logits = torch.where(any_c, logits, torch.zeros_like(logits))        # double where: no NaN rows
        w = torch.softmax(logits, -1)
        signed = forward_flip(self.vertices.unsqueeze(0), d.unsqueeze(-2))   # (B, V, 3)
        mean = (w.unsqueeze(-1) * signed).sum(-2)
        u, _ = unit_nonzero(mean)
        return u


def build_getter(cls, sh_volume, sphere, affine, sh_frame, max_angle, pmf_threshold, relative_peak_threshold,
                 min_separation_angle, max_peaks, sh_basis="descoteaux07", legacy=True, **kw):
    field = make_pmf_field(as_tensor(sh_volume), sphere, affine, sh_frame, sh_basis, legacy)
    try:
        return cls(field, max_angle, pmf_threshold, relative_peak_threshold, min_separation_angle, max_peaks, **kw)
    except TractfuncError:
        raise
    except ValueError as e:
        raise TractfuncError(str(e)) from None


def closest_peak(sh_volume: Tensor, max_angle: float = 20.0, sphere="default", pmf_threshold: float = 0.1,
                 relative_peak_threshold: float = 0.5, min_separation_angle: float = 25.0, max_peaks: int = 16,
                 affine=None, sh_frame: str = DEFAULT_SH_FRAME, sh_basis: Optional[str] = "descoteaux07",
                 legacy: bool = True) -> ClosestPeakGetter:
    """Closest-peak getter (DIPY ``ClosestPeakDirectionGetter.from_shcoeff(sh, max_angle, sphere,
    pmf_threshold, basis_type, legacy, relative_peak_threshold=..., min_separation_angle=...)``).

    Args:
        sh_volume: (X, Y, Z, N) SH coefficients in the basis ``sh_basis`` (torch, NumPy or DLPack; float64
            for DIPY's arithmetic); dtype/device of the getter.
        max_angle: degrees (DIPY's getters have no default; 20 is ``deterministic_tracking``'s).
        sphere: a DIPY ``Sphere`` / ``HemiSphere``, a DIPY sphere name or a tractfunc ``Sphere``.
        pmf_threshold, relative_peak_threshold, min_separation_angle: DIPY's (0.1, 0.5, 25 degrees).
        max_peaks: peaks kept per point (see :mod:`tractfunc.local.peaks`).
        affine: (4, 4), needed only with ``sh_frame="scanner"``; :func:`tractfunc.local.tracker.local_tracking`
            then takes it from the getter.
        sh_frame: ``"voxel"`` (default, DIPY) or ``"scanner"`` (module docstring).
        sh_basis, legacy: DIPY's ``basis_type`` and ``legacy`` (default ``"descoteaux07"``, True, as DIPY);
            an MRtrix3 FOD is ``"tournier07"``, False (or ``"mrtrix"``).

    Returns:
        :class:`ClosestPeakGetter`.
    """
    return build_getter(ClosestPeakGetter, sh_volume, sphere, affine, sh_frame, max_angle, pmf_threshold,
                  relative_peak_threshold, min_separation_angle, max_peaks, sh_basis, legacy)


def deterministic_maximum(sh_volume: Tensor, max_angle: float = 20.0, sphere="default",
                          pmf_threshold: float = 0.1, relative_peak_threshold: float = 0.5,
                          min_separation_angle: float = 25.0, max_peaks: int = 16, affine=None,
                          sh_frame: str = DEFAULT_SH_FRAME, mode: str = "hard", temperature: float = 0.05,
                          sh_basis: Optional[str] = "descoteaux07", legacy: bool = True) -> DeterministicMaximumGetter:
    """Deterministic-maximum getter (DIPY ``DeterministicMaximumDirectionGetter.from_shcoeff``); the
    peak parameters only shape the initial directions at seeds.  mode/temperature: gradient options (module
    docstring); the rest (sh_basis/legacy included) as :func:`closest_peak`."""
    return build_getter(DeterministicMaximumGetter, sh_volume, sphere, affine, sh_frame, max_angle, pmf_threshold,
                  relative_peak_threshold, min_separation_angle, max_peaks, sh_basis, legacy, mode=mode,
                  temperature=temperature)
