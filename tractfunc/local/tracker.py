"""DIPY-style local tracking (``dipy.tracking.local_tracking.LocalTracking``, 1.12), batched in PyTorch.

What is reproduced, from DIPY's source:

* **frames**: seeds are given in the space of ``affine`` (scanner mm for a NIfTI affine, voxels for the
  identity) and mapped to voxel coordinates with its inverse; tracking runs in voxel coordinates with
  ``voxel_size`` = the column norms of ``affine[:3, :3]`` (no shear allowed); output goes back through
  ``affine``;
* **initial directions**: at each seed, the getter's peaks (``getter.initial_directions``, DIPY's
  ``initial_direction``), the first ``max_cross`` of them, one streamline each; a seed with none gives a
  one-point streamline (with ``return_all``);
* **each half** (``DirectionGetter.generate_streamline``, fixed step): the seed is the first point and is
  not tested; then per step ``dir, ok = getter(pos, dir)`` (not ok: stop, status TRACKPOINT), ``pos +=
  dir / voxel_size * step_size``, status = the stopping criterion at the new point; TRACKPOINT continues,
  anything else stops *without* keeping that point; after ``maxlen`` steps the half has ``maxlen + 1``
  points;
* **backward half**: from the seed along ``-d0``, or along ``F[0] - F[1]`` normalised when the forward half
  has more than one point; output = reversed backward half (without its seed) + forward half;
* **kept** (``return_all=False``): both halves ended in ENDPOINT or OUTSIDEIMAGE and
  ``minlen <= points <= maxlen``; ``return_all=True`` (DIPY's default) keeps everything.

Stopping criteria (callables ``pos_vox (B, 3) -> status (B,)`` int64 with DIPY's codes, :class:`Status`):
:func:`threshold_criterion` (``ThresholdStoppingCriterion``: the map interpolated with DIPY's trilinear
rule, ``> threshold`` continues, outside the image OUTSIDEIMAGE) and :func:`binary_criterion`
(``BinaryStoppingCriterion``: nearest voxel by round-half-to-even, non-zero continues).

State is fixed-shape with an ``alive`` mask (``torch.where``).  With ``early_exit`` (eager mode, the
default) the loop ends once every half has stopped, and the getter and criterion run on the running halves
only (gathered, then scattered back); ``early_exit=False`` (automatic under ``torch.compile`` /
``torch.func``) runs all ``maxlen`` steps without data-dependent Python control flow.  Gradients: see
:mod:`tractfunc.local.getters`.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Callable, List, NamedTuple, Optional

import numpy as np
import torch

from ..core.arrays import as_tensor
from .getters import trilinear_dipy
from ..core.tracing import is_tracing

Tensor = torch.Tensor


class Status(IntEnum):
    """DIPY's ``StreamlineStatus`` codes."""
    OUTSIDEIMAGE = -1
    INVALIDPOINT = 0
    TRACKPOINT = 1
    ENDPOINT = 2


def _converter(t: Tensor):
    """``f(like, dtype=None)``: ``t`` on ``like``'s device (and in ``dtype``), converted once per pair."""
    cache = {}

    def to(like: Tensor, dtype=None) -> Tensor:
        key = (like.device, dtype)
        if key not in cache:
            cache[key] = t.to(device=like.device, dtype=dtype) if dtype is not None else t.to(like.device)
        return cache[key]
    return to


def threshold_criterion(metric_map: Tensor, threshold: float) -> Callable[[Tensor], Tensor]:
    """DIPY ``ThresholdStoppingCriterion(metric_map, threshold)``: metric_map (X, Y, Z) (e.g. FA, GFA)."""
    vol = torch.as_tensor(metric_map).contiguous().unsqueeze(-1)   # sampling gathers rows of the flat volume
    if vol.dim() != 4:
        raise ValueError(f"metric map has shape {tuple(vol.shape[:-1])}; expected (X, Y, Z)")

    as_pos = _converter(vol)

    def check(pos_vox: Tensor) -> Tensor:
        v, inside = trilinear_dipy(as_pos(pos_vox, pos_vox.dtype), pos_vox)
        code = torch.where(v[..., 0] > threshold, Status.TRACKPOINT, Status.ENDPOINT)
        return torch.where(inside, code, Status.OUTSIDEIMAGE)
    return check


def binary_criterion(mask: Tensor) -> Callable[[Tensor], Tensor]:
    """DIPY ``BinaryStoppingCriterion(mask)``: mask (X, Y, Z), ``> 0`` inside."""
    m = torch.as_tensor(mask) > 0
    if m.dim() != 3:
        raise ValueError(f"mask has shape {tuple(m.shape)}; expected (X, Y, Z)")
    dims = m.shape
    as_pos = _converter(m)

    def check(pos_vox: Tensor) -> Tensor:
        r = torch.round(pos_vox.detach())                                     # rint: half to even
        hi = torch.as_tensor(dims, dtype=r.dtype, device=r.device)
        inside = ((r >= 0) & (r < hi)).all(-1)
        idx = r.long().clamp(min=0)
        idx = torch.minimum(idx, (hi - 1).long())
        val = as_pos(r)[idx[..., 0], idx[..., 1], idx[..., 2]]
        code = torch.where(val, Status.TRACKPOINT, Status.ENDPOINT)
        return torch.where(inside, code, Status.OUTSIDEIMAGE)
    return check


class Half(NamedTuple):
    """points: (M, T + 1, 3) voxel coords (row i valid for i < n); n: (M,) int64 points kept;
    status: (M,) int64 :class:`Status` at the end."""
    points: Tensor
    n: Tensor
    status: Tensor


def track_half(getter, criterion, pos0: Tensor, dir0: Tensor, voxel_size: Tensor, step_size, maxlen: int,
               generator: Optional[torch.Generator] = None, early_exit: bool = True) -> Half:
    """One half of every streamline from pos0 (M, 3) voxel along dir0 (M, 3) (DIPY ``local_tracker``
    with a fixed step).  voxel_size: (3,) mm; step_size: mm (float or 0-d tensor)."""
    early_exit = early_exit and not is_tracing(pos0, dir0)
    pos, d = pos0, dir0
    M = pos.shape[0]
    alive = torch.ones(M, dtype=torch.bool, device=pos.device)
    n = torch.full((M,), maxlen + 1, dtype=torch.int64, device=pos.device)
    status = torch.full((M,), int(Status.TRACKPOINT), dtype=torch.int64, device=pos.device)
    pts = [pos]
    for i in range(1, maxlen + 1):
        if early_exit:   # evaluate the getter and the criterion on the running halves only
            new_dir, ok, st = _active_step(getter, criterion, pos, d, alive, voxel_size, step_size, generator)
        else:
            new_dir, ok = getter(pos, d, generator)
        moving = alive & ok
        cand = pos + new_dir / voxel_size * step_size
        if not early_exit:
            st = criterion(cand)
        ended = (alive & ~ok) | (moving & (st != Status.TRACKPOINT))
        n = torch.where(ended, i, n)
        status = torch.where(moving, st, status)
        pos = torch.where(moving.unsqueeze(-1), cand, pos)
        d = torch.where(moving.unsqueeze(-1), new_dir, d)
        pts.append(pos)
        alive = moving & (st == Status.TRACKPOINT)
        if early_exit and not bool(alive.any()):
            break
    return Half(torch.stack(pts, 1), n, status)


def _active_step(getter, criterion, pos, d, alive, voxel_size, step_size, generator):
    """Getter and criterion on the rows where ``alive`` (gathered, then scattered back into the fixed
    shapes; other rows: direction unchanged, not ok, status TRACKPOINT)."""
    idx = torch.nonzero(alive).squeeze(-1)
    nd, ok = getter(pos[idx], d[idx], generator)
    st = criterion(pos[idx] + nd / voxel_size * step_size)
    new_dir = d.index_put((idx,), nd.to(d.dtype))
    ok_all = torch.zeros_like(alive).index_put((idx,), ok)
    st_all = torch.full_like(alive, int(Status.TRACKPOINT), dtype=torch.int64).index_put((idx,), st)
    return new_dir, ok_all, st_all


def backward_start(fwd: Half, dir0: Tensor) -> Tensor:
    """DIPY's backward first step: ``(F[0] - F[1]) / |F[0] - F[1]|`` where the forward half has more than
    one point (and that is non-zero), else ``-dir0``.  (M, 3)."""
    if fwd.points.shape[1] < 2:
        return -dir0
    opp = fwd.points[:, 0] - fwd.points[:, 1]
    nrm = torch.linalg.vector_norm(opp, dim=-1, keepdim=True)
    use = (fwd.n > 1).unsqueeze(-1) & (nrm > 0)
    return torch.where(use, opp / torch.where(nrm > 0, nrm, torch.ones_like(nrm)), -dir0)


def join(fwd: Half, bwd: Half) -> tuple[Tensor, Tensor]:
    """DIPY's assembly: reversed backward half without its seed, then the forward half.
    -> (points (M, Tb + Tf + 1, 3), lengths (M,) = nF + nB - 1)."""
    tb = bwd.points.shape[1]
    both = torch.cat([bwd.points, fwd.points], 1)                            # (M, Tb + Tf, 3)
    L = tb + fwd.points.shape[1] - 1
    j = torch.arange(L, device=both.device).unsqueeze(0)                      # (1, L)
    nb1 = (bwd.n - 1).unsqueeze(-1)                                           # (M, 1)
    src = torch.where(j < nb1, nb1 - j, tb + j - nb1).clamp(max=both.shape[1] - 1)
    out = torch.gather(both, 1, src.unsqueeze(-1).expand(-1, -1, 3))
    return out, fwd.n + bwd.n - 1


class LocalTracks(NamedTuple):
    """points: (M, L, 3) in the affine's space (row i valid for i < lengths); lengths: (M,) int64;
    seed_ids: (M,) int64 index of each streamline's seed; status: (M, 2) int64 end status of the
    forward and backward halves (the backward one TRACKPOINT for one-point streamlines); kept: (M,) bool,
    what DIPY yields.  Streamlines are in DIPY's order (by seed, then by peak)."""
    points: Tensor
    lengths: Tensor
    seed_ids: Tensor
    status: Tensor
    kept: Tensor

    def streamlines(self) -> List[np.ndarray]:
        """The kept streamlines as a list of (n_i, 3) float64 NumPy arrays (what DIPY yields)."""
        pts = self.points.detach().cpu().numpy()
        ln = self.lengths.cpu().numpy()
        keep = self.kept.cpu().numpy()
        return [pts[i, :ln[i]].astype(np.float64) for i in np.flatnonzero(keep)]


def _voxel_size(affine: np.ndarray) -> np.ndarray:
    lin = affine[:3, :3]
    g = lin.T @ lin
    if not np.allclose(np.triu(g, 1), 0.0, atol=1e-5):
        raise ValueError("the affine has shear; DIPY's local tracking needs a regular grid")
    return np.sqrt(g.diagonal())


def _starts(getter, seeds_vox: Tensor, max_cross: Optional[int], initial_directions: Optional[Tensor]):
    """(seed ids (R,), start dirs (R, 3), has_dir (R,)) in DIPY's order; seeds without a direction get one
    row with has_dir False."""
    if initial_directions is None:
        pk = getter.initial_directions(seeds_vox)
        dirs, valid = pk.dirs, pk.valid
    else:
        nrm = torch.linalg.vector_norm(initial_directions, dim=-1, keepdim=True)
        valid = nrm.squeeze(-1) > 0
        dirs = initial_directions / torch.where(nrm > 0, nrm, torch.ones_like(nrm))
        order = torch.sort((~valid).to(torch.uint8), dim=-1, stable=True).indices   # DIPY drops zero rows
        valid = torch.gather(valid, 1, order)
        dirs = torch.gather(dirs, 1, order.unsqueeze(-1).expand(-1, -1, 3))
    if max_cross is not None:
        dirs, valid = dirs[:, :max_cross], valid[:, :max_cross]
    S, K = valid.shape
    empty = ~valid.any(-1)
    sid, k = torch.nonzero(valid, as_tuple=True)
    esid = torch.nonzero(empty, as_tuple=True)[0]
    all_sid = torch.cat([sid, esid])
    all_k = torch.cat([k, torch.full_like(esid, -1)])
    order = torch.argsort(all_sid * (K + 1) + all_k + 1)
    all_sid, all_k = all_sid[order], all_k[order]
    d0 = dirs[all_sid, all_k.clamp(min=0)]
    return all_sid, d0, all_k >= 0


def local_tracking(getter, criterion, seeds: Tensor, affine, step_size, maxlen: int = 500, minlen: int = 2,
                   return_all: bool = True, max_cross: Optional[int] = None,
                   initial_directions: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                   early_exit: bool = True) -> LocalTracks:
    """DIPY ``LocalTracking(getter, criterion, seeds, affine, step_size, maxlen=500, minlen=2,
    return_all=True, max_cross=None, fixedstep=True)``, batched.

    getter: a direction getter (:mod:`tractfunc.local.getters`); criterion: ``pos_vox (B, 3) -> status (B,)``;
    seeds: (S, 3) in the space of ``affine`` (4, 4) (scanner mm for a NIfTI affine); step_size: mm;
    maxlen/minlen: points per half / per streamline as in DIPY; initial_directions: (S, K, 3) instead of
    the getter's peaks (zero rows ignored).  Returns :class:`LocalTracks` in the affine's space, dtype of
    ``getter.field.sh``."""
    seeds = as_tensor(seeds)   # NumPy / DLPack arrays accepted, as elsewhere at the public boundary
    if initial_directions is not None:
        initial_directions = as_tensor(initial_directions).to(dtype=getter.field.sh.dtype, device=getter.field.sh.device)
        if initial_directions.dim() != 3 or initial_directions.shape[0] != seeds.shape[0] \
                or initial_directions.shape[-1] != 3:
            raise ValueError(f"initial_directions have shape {tuple(initial_directions.shape)}; expected "
                             f"({seeds.shape[0]}, K, 3), K directions per seed")
    if seeds.dim() != 2 or seeds.shape[-1] != 3:
        raise ValueError(f"seeds have shape {tuple(seeds.shape)}; expected (S, 3)")
    if maxlen < 1 or minlen > maxlen:
        raise ValueError(f"need maxlen >= 1 and minlen <= maxlen, got maxlen={maxlen}, minlen={minlen}")
    if not float(step_size) > 0:
        raise ValueError(f"step_size must be > 0, got {float(step_size)}")
    A = np.asarray(affine, dtype=np.float64)
    if A.shape != (4, 4):
        raise ValueError(f"affine has shape {A.shape}; expected (4, 4)")
    dtype, device = getter.field.sh.dtype, getter.field.sh.device
    vs = torch.as_tensor(_voxel_size(A), dtype=dtype, device=device)
    inv = torch.as_tensor(np.linalg.inv(A), dtype=dtype, device=device)
    seeds = seeds.to(dtype=dtype, device=device)
    seeds_vox = seeds @ inv[:3, :3].T + inv[:3, 3]
    sid, d0, has_dir = _starts(getter, seeds_vox, max_cross, initial_directions)
    p0 = seeds_vox[sid]
    fwd = track_half(getter, criterion, p0, d0, vs, step_size, maxlen, generator, early_exit)
    fwd = fwd._replace(n=torch.where(has_dir, fwd.n, 1),
                       status=torch.where(has_dir, fwd.status, int(Status.TRACKPOINT)))
    bwd = track_half(getter, criterion, p0, backward_start(fwd, d0), vs, step_size, maxlen, generator, early_exit)
    bwd = bwd._replace(n=torch.where(has_dir, bwd.n, 1),
                       status=torch.where(has_dir, bwd.status, int(Status.TRACKPOINT)))
    pts, lengths = join(fwd, bwd)
    Af = torch.as_tensor(A, dtype=dtype, device=device)
    pts = pts @ Af[:3, :3].T + Af[:3, 3]
    status = torch.stack([fwd.status, bwd.status], -1)
    ends = (status == Status.ENDPOINT) | (status == Status.OUTSIDEIMAGE)
    valid = ends.all(-1) & (lengths >= minlen) & (lengths <= maxlen) & has_dir
    kept = torch.ones_like(valid) if return_all else valid
    return LocalTracks(pts, lengths, sid, status, kept)


def track_command(a) -> int:
    """``tractfunc track --algorithm closest_peak | det_max``: argparse namespace -> tractogram file.

    Seeds: ``--seed-points`` (scanner mm) or ``--seed-image`` (``--seeds`` uniform points in its non-zero
    voxels, default 1000, from ``--rng-seed``); one streamline per seed peak (DIPY), the first ``--select``
    kept.  Stopping: ``--fa-map`` with ``--stop-threshold`` (ThresholdStoppingCriterion) or ``--mask``
    (BinaryStoppingCriterion)."""
    import sys
    from . import getters
    from .. import io
    from ..core import seeds as S
    from ..errors import TractfuncError
    if bool(a.fa_map) == bool(a.mask):
        raise TractfuncError(f"--algorithm {a.algorithm} stops on --fa-map (with --stop-threshold) or on --mask; "
                             "give exactly one")
    if a.seed_directions:
        raise TractfuncError(f"--algorithm {a.algorithm} starts from the peaks at each seed; --seed-directions "
                             "applies to sd_stream only")
    dtype = {"float32": torch.float32, "float64": torch.float64}[a.dtype]
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    fod = io.load_fod(a.fod, sh_basis=a.sh_basis)
    stop_img = io.load_mask(a.mask) if a.mask else _load_scalar(a.fa_map)
    if not io.same_grid(stop_img, fod):
        raise TractfuncError(f"{a.mask or a.fa_map}: grid {stop_img.data.shape} does not match the FOD grid "
                             f"{fod.data.shape[:3]} (same dimensions and affine expected)")
    vol = torch.as_tensor(np.asarray(stop_img.data, dtype=np.float64), dtype=dtype, device=device)
    crit = binary_criterion(vol) if a.mask else threshold_criterion(vol, a.stop_threshold)
    factory = getters.closest_peak if a.algorithm == "closest_peak" else getters.deterministic_maximum
    if a.algorithm in ("prob", "ifod1"):   # sampling getters (tractfunc.local.probabilistic, docs/probabilistic.md)
        from . import probabilistic
        factory = probabilistic.cli_factory(a)
    gen = torch.Generator(device=device).manual_seed(a.rng_seed)
    try:
        g = factory(torch.as_tensor(fod.data, dtype=dtype, device=device), max_angle=a.angle or DEFAULT_ANGLE,
                    sphere=a.sphere, pmf_threshold=a.pmf_threshold, relative_peak_threshold=a.relative_peak_threshold,
                    min_separation_angle=a.min_separation_angle, affine=fod.affine, sh_frame=a.sh_frame)
    except ValueError as e:
        raise TractfuncError(str(e)) from None
    rng = np.random.default_rng(a.rng_seed)
    if a.seed_points:
        pts = io.read_seed_points(a.seed_points)
    else:
        seed_img = io.load_mask(a.seed_image)
        if not seed_img.data.any():
            raise TractfuncError(f"{a.seed_image}: seed image has no non-zero voxel; expected a non-empty seed region")
        pts = S.random_in_mask_np(seed_img.data, seed_img.affine, a.seeds or 1000, rng)
    out: List[np.ndarray] = []
    for start in range(0, len(pts), a.chunk):
        if a.select and len(out) >= a.select:
            break
        res = local_tracking(g, crit, torch.as_tensor(pts[start:start + a.chunk], dtype=dtype, device=device),
                             fod.affine, a.step or DEFAULT_STEP, maxlen=a.maxlen, return_all=not a.valid_only,
                             max_cross=a.max_cross, generator=gen)
        out.extend(res.streamlines())
    if a.select:
        out = out[:a.select]
    header = {"method": f"{a.algorithm} (tractfunc, DIPY LocalTracking semantics)", "step_size": a.step or DEFAULT_STEP,
              "max_angle": a.angle or DEFAULT_ANGLE, "pmf_threshold": a.pmf_threshold, "source": a.fod}
    io.write_tractogram(a.output, out, fod, header)
    if not a.quiet:
        print(f"{a.output}: {len(out)} streamlines from {len(pts)} seeds")
    sys.stdout.flush()
    return 0


def _load_scalar(path: str):
    """A 3-D scalar map (FA, GFA, ...) as an :class:`tractfunc.io.Image` of float64."""
    from .. import io
    data, A, vox = io.images._read(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise io.TractfuncError(f"{path}: scalar map has shape {data.shape}; expected a 3-D image")
    data = np.asarray(data, dtype=np.float64)
    if not np.isfinite(data).all():
        raise io.TractfuncError(f"{path}: scalar map holds NaN/Inf; expected finite values")
    return io.Image(data, A, vox)


DEFAULT_STEP = 0.2    # mm; dipy.tracking.tracker.deterministic_tracking's step_size
DEFAULT_ANGLE = 20.0  # degrees; its max_angle
