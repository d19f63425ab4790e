"""``deterministic_tracking`` and ``probabilistic_tracking`` with DIPY 1.12's signatures and semantics
(``dipy.tracking.tracker``), batched in PyTorch: DIPY code runs by changing the import.

What DIPY 1.12 does (``tracker.generic_tracking``, ``tractogen.generate_tractogram``, ``propspeed``), and so
what these do:

* **lengths in mm**: ``max_nbr_pts = int(max_len / step_size)``, ``min_nbr_pts = int(min_len / step_size)``
  (``local_tracking``'s ``maxlen`` / ``minlen`` count points instead, as DIPY's ``LocalTracking``);
* **PMF**: ``sh`` (basis ``basis_type`` / ``legacy``, DIPY's default ``descoteaux07``, ``legacy=True``) on
  ``sphere`` (default DIPY's ``default_sphere``), directions read in the array axes (``sh_frame="voxel"``),
  or ``sf``, values on ``sphere``'s vertices (required then); interpolated with DIPY's trilinear rule;
  ``pmf_threshold`` as the getters';
* **seeds**: world coordinates mapped with ``inv(affine)``; without ``seed_directions``, one streamline per
  seed along the largest peak of the (unthresholded) PMF there (``peaks_from_positions(npeaks=1)``:
  relative threshold 0.5, separation 25 degrees); a seed without a peak gives nothing.  Given
  ``seed_directions`` (N, 3) (array-axis frame, as DIPY) are used as they are; a norm outside
  [0.99, 1.01] gives a one-point invalid streamline;
* **propagation**: ``deterministic``: the vertex of largest thresholded PMF strictly inside the cone
  ``|cos| > cos(max_angle)`` (:class:`tractfunc.local.getters.DeterministicMaximumGetter`); ``probabilistic``:
  a vertex drawn by inverse CDF from the thresholded PMF in the cone ``|cos| >= cos(max_angle)``
  (:class:`tractfunc.local.probabilistic.ProbabilisticGetter`); the step ``pos += dir / voxel_size *
  step_size`` with ``voxel_size`` (default the column norms of ``affine[:3, :3]``);
* **each half**: at most ``max_nbr_pts - 1`` steps and points (the last step's point is dropped, as
  DIPY 1.12 does); a stop by the criterion drops the point tested (as ``LocalTracking``);
* **kept**: ``(valid or return_all) and min_nbr_pts <= points <= max_nbr_pts``, valid = both ends
  ENDPOINT or OUTSIDEIMAGE: even with ``return_all`` a streamline longer than ``max_len`` is dropped (DIPY).

Returned: a **generator** of (n, 3) float64 NumPy streamlines in world coordinates, or ``(streamline,
seed)`` pairs with ``save_seeds``, as DIPY's (wrap it in ``Streamlines(...)`` or ``list(...)``).  Inputs are
checked and the seed directions found when the function is called; the tracking runs chunk by chunk as the
generator is consumed (``chunk_size`` seeds at a time, at most ``ceil(N * seed_buffer_fraction)``).

Differences, by design: ``pam`` (EuDX-style peaks) is not supported (a one-line error); ``nbr_threads`` is
accepted and ignored (torch's intra-op threads: ``torch.set_num_threads``); random numbers come from a
``torch.Generator`` seeded with ``random_seed`` (> 0: the same seeds and ``chunk_size`` give the same
streamlines; 0: fresh entropy, as DIPY's time seed), not DIPY's per-seed generator, so probabilistic
streamlines agree with DIPY's in distribution, not one by one.  The arithmetic follows the inputs' dtype
and device (a float64 NumPy ``sh``, DIPY's case, tracks in float64).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import torch

from ..core.arrays import as_tensor
from ..errors import TractfuncError
from .criteria import as_criterion
from .getters import DeterministicMaximumGetter, PmfGetter, make_pmf_field, make_sf_field, pmf_at
from .peaks import peak_directions
from .probabilistic import ProbabilisticGetter
from .tracker import bidirectional, ends_valid

Tensor = torch.Tensor
_SEED_PEAKS = dict(relative_peak_threshold=0.5, min_separation_angle=25.0, max_peaks=16)   # DIPY's defaults


def _field(sh, sf, pam, sphere, basis_type, legacy, dtype, device):
    """The PMF field from exactly one of ``sh`` / ``sf`` (``pam``: an error)."""
    given = [n for n, v in (("sh", sh), ("pam", pam), ("sf", sf)) if v is not None]
    if len(given) != 1:
        raise TractfuncError(f"give exactly one of sh, sf (pam is not supported); got {', '.join(given) or 'none'}")
    if pam is not None:
        raise TractfuncError("pam (EuDX-style PeaksAndMetrics) is not supported; pass sh= (SH coefficients) or "
                             "sf= (values on a sphere)")
    vol = as_tensor(sh if sh is not None else sf)
    vol = vol.to(dtype=dtype or vol.dtype, device=device or vol.device)
    if not vol.is_floating_point():
        vol = vol.double()
    if sh is not None:
        return make_pmf_field(vol, sphere, None, "voxel", basis_type, legacy)
    return make_sf_field(vol, sphere)


def _seed_starts(getter: PmfGetter, seeds_vox: Tensor, seed_directions: Optional[Tensor]):
    """(row seeds (R,) int64, start dirs (R, 3), has_dir (R,) bool): DIPY's pairing of seeds and
    directions (the largest peak of the raw PMF, seeds without one dropped; or the given ones, a norm
    outside [0.99, 1.01] invalid)."""
    if seed_directions is not None:
        n = torch.linalg.vector_norm(seed_directions, dim=-1)
        return torch.arange(seeds_vox.shape[0], device=seeds_vox.device), seed_directions, (n >= 0.99) & (n <= 1.01)
    pk = peak_directions(pmf_at(getter.field, seeds_vox), getter.field.sphere, **_SEED_PEAKS)
    rows = torch.nonzero(pk.valid[:, 0]).squeeze(-1)
    d0 = pk.dirs[rows, 0]
    return rows, d0, torch.ones_like(rows, dtype=torch.bool)


def _generator(random_seed: int, device) -> torch.Generator:
    if int(random_seed) < 0:
        raise TractfuncError(f"random_seed must be >= 0, got {random_seed}")
    g = torch.Generator(device=device)
    if int(random_seed) > 0:
        g.manual_seed(int(random_seed))
    else:
        g.seed()   # DIPY: a time seed, so every run differs
    return g


def _run(getter: PmfGetter, seed_positions, sc, affine, seed_directions, min_len, max_len, step_size, voxel_size,
         random_seed, seed_buffer_fraction, return_all, save_seeds, chunk_size, generator) -> Iterator:
    """Shared body of the two functions: checks and seed directions now, tracking as consumed."""
    dtype, device = getter.field.sh.dtype, getter.field.sh.device
    A = np.asarray(affine, dtype=np.float64)
    if A.shape != (4, 4):
        raise TractfuncError(f"affine has shape {A.shape}; expected (4, 4)")
    seeds_w = np.asarray(seed_positions.detach().cpu() if isinstance(seed_positions, Tensor) else seed_positions,
                         dtype=np.float64)
    if seeds_w.ndim != 2 or seeds_w.shape[1] != 3:
        raise TractfuncError(f"seed_positions have shape {seeds_w.shape}; expected (N, 3) world coordinates")
    if not float(step_size) > 0:
        raise TractfuncError(f"step_size must be > 0 mm, got {step_size}")
    max_pts, min_pts = int(max_len / step_size), int(min_len / step_size)
    if max_pts < 2:
        raise TractfuncError(f"max_len={max_len} mm is under two steps of {step_size} mm; expected >= 2 * step_size")
    if not 0 < seed_buffer_fraction <= 1:
        raise TractfuncError(f"seed_buffer_fraction must be in (0, 1], got {seed_buffer_fraction}")
    if int(chunk_size) < 1:
        raise TractfuncError(f"chunk_size must be a positive number of seeds, got {chunk_size}")
    vs = np.sqrt((A[:3, :3] ** 2).sum(0)) if voxel_size is None else np.asarray(voxel_size, dtype=np.float64)
    if vs.shape != (3,) or not (vs > 0).all():
        raise TractfuncError(f"voxel_size must be 3 positive lengths in mm, got {vs}")
    crit = as_criterion(sc, getter.field.sh.shape[:3])
    inv = np.linalg.inv(A)
    seeds_vox = torch.as_tensor(seeds_w @ inv[:3, :3].T + inv[:3, 3], dtype=dtype, device=device)
    if seed_directions is not None:
        seed_directions = as_tensor(seed_directions).to(dtype=dtype, device=device)
        if tuple(seed_directions.shape) != tuple(seeds_vox.shape):
            raise TractfuncError(f"seed_directions have shape {tuple(seed_directions.shape)}; expected "
                                 f"{tuple(seeds_vox.shape)}, one per seed position")
    rows, d0, has_dir = _seed_starts(getter, seeds_vox, seed_directions)
    gen = generator if generator is not None else _generator(random_seed, device)
    vs_t = torch.as_tensor(vs, dtype=dtype, device=device)
    Af = torch.as_tensor(A, dtype=dtype, device=device)
    chunk = max(1, min(int(chunk_size), math.ceil(len(seeds_w) * seed_buffer_fraction)))

    def stream():
        for start in range(0, rows.shape[0], chunk):
            r, d, ok = rows[start:start + chunk], d0[start:start + chunk], has_dir[start:start + chunk]
            with torch.no_grad():
                pts, n, status, _ = bidirectional(getter, crit, seeds_vox[r], d, ok, vs_t, float(step_size),
                                                  max_pts - 1, gen, True, max_pts - 1)
            keep = ((ends_valid(status) & ok) | bool(return_all)) & (n >= min_pts) & (n <= max_pts)
            idx = torch.nonzero(keep).squeeze(-1)
            world = (pts[idx] @ Af[:3, :3].T + Af[:3, 3]).cpu().numpy().astype(np.float64, copy=False)
            lengths, seed_of = n[idx].cpu().numpy(), r[idx].cpu().numpy()
            for j in range(len(idx)):
                s = world[j, :lengths[j]].copy()
                yield (s, seeds_w[seed_of[j]].copy()) if save_seeds else s
    return stream()


def _getter(cls, field, max_angle, pmf_threshold):
    """``cls`` (a PMF getter) on ``field`` with DIPY's seed-peak settings; its ValueError as a one-line
    TractfuncError."""
    try:
        return cls(field, max_angle, pmf_threshold, **_SEED_PEAKS)
    except ValueError as e:
        raise TractfuncError(str(e)) from None


def deterministic_tracking(seed_positions, sc, affine, *, seed_directions=None, sh=None, pam=None, sf=None,
                           min_len=2, max_len=500, step_size=0.2, voxel_size=None, max_angle=20,
                           pmf_threshold=0.1, sphere=None, basis_type=None, legacy=True, nbr_threads=0,
                           random_seed=0, seed_buffer_fraction=1.0, return_all=True, save_seeds=False,
                           chunk_size: int = 10000, dtype=None, device=None,
                           generator: Optional[torch.Generator] = None) -> Iterator:
    """DIPY 1.12's ``dipy.tracking.tracker.deterministic_tracking`` (module docstring), batched.

    Args:
        seed_positions: (N, 3) world coordinates (the space of ``affine``).
        sc: stopping criterion: a DIPY ``StoppingCriterion`` object or a tractfunc one
            (:mod:`tractfunc.local.criteria`).
        affine: (4, 4) voxel -> world.
        seed_directions: (N, 3) unit start directions in the array-axis frame, or None (the largest peak).
        sh: (X, Y, Z, N) SH coefficients in ``basis_type`` / ``legacy`` (DIPY's default ``descoteaux07``,
            True); or sf: (X, Y, Z, V) PMF values on ``sphere``'s vertices; pam: not supported.
        min_len, max_len: mm (DIPY's defaults 2 and 500).
        step_size: mm (0.2); voxel_size: (3,) mm, default from ``affine``; max_angle: degrees (20);
        pmf_threshold: relative (0.1); sphere: a DIPY sphere object or name, or a tractfunc ``Sphere``.
        nbr_threads: ignored; random_seed: unused by the deterministic rule (checked only).
        seed_buffer_fraction: at most ``ceil(N * fraction)`` seeds tracked at once.
        return_all: DIPY's; save_seeds: yield ``(streamline, seed)`` pairs.
        chunk_size, dtype, device, generator: tractfunc's (seeds per batch; arithmetic dtype/device, default
            those of ``sh`` / ``sf``; a ``torch.Generator`` instead of ``random_seed``).

    Returns:
        A generator of (n, 3) float64 world-coordinate streamlines (or pairs), in seed order.
    """
    field = _field(sh, sf, pam, sphere, basis_type, legacy, dtype, device)
    getter = _getter(DeterministicMaximumGetter, field, max_angle, pmf_threshold)
    return _run(getter, seed_positions, sc, affine, seed_directions, min_len, max_len, step_size, voxel_size,
                random_seed, seed_buffer_fraction, return_all, save_seeds, chunk_size, generator)


def probabilistic_tracking(seed_positions, sc, affine, *, seed_directions=None, sh=None, pam=None, sf=None,
                           min_len=2, max_len=500, step_size=0.2, voxel_size=None, max_angle=20,
                           pmf_threshold=0.1, sphere=None, basis_type=None, legacy=True, nbr_threads=0,
                           random_seed=0, seed_buffer_fraction=1.0, return_all=True, save_seeds=False,
                           chunk_size: int = 10000, dtype=None, device=None,
                           generator: Optional[torch.Generator] = None) -> Iterator:
    """DIPY 1.12's ``dipy.tracking.tracker.probabilistic_tracking`` (module docstring), batched.

    Args: as :func:`deterministic_tracking`; random_seed: > 0 seeds a ``torch.Generator`` (reproducible for
    the same seeds and ``chunk_size``), 0 (DIPY's default) draws fresh entropy; ``generator`` overrides it.

    Returns:
        A generator of (n, 3) float64 world-coordinate streamlines (or ``(streamline, seed)`` pairs).
    """
    field = _field(sh, sf, pam, sphere, basis_type, legacy, dtype, device)
    getter = _getter(ProbabilisticGetter, field, max_angle, pmf_threshold)
    return _run(getter, seed_positions, sc, affine, seed_directions, min_len, max_len, step_size, voxel_size,
                random_seed, seed_buffer_fraction, return_all, save_seeds, chunk_size, generator)
