"""DIPY-style local tracking (``dipy.tracking.local_tracking.LocalTracking``, 1.12), batched in PyTorch.

What is reproduced, from DIPY's source:

* **frames**: seeds are given in the space of ``affine`` (scanner mm for a NIfTI affine, voxels for the
  identity; given once, to :func:`local_tracking` or to the getter) and mapped to voxel coordinates with
  its inverse; tracking runs in voxel coordinates with ``voxel_size`` = the column norms of
  ``affine[:3, :3]`` (no shear allowed); output goes back through ``affine``;
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

Stopping criteria (:mod:`tractfunc.local.criteria`, re-exported here): callables ``pos_vox (B, 3) -> status
(B,)`` int64 with DIPY's codes (:class:`Status`), :func:`threshold_criterion` and :func:`binary_criterion`,
or DIPY's own criterion objects.

Lengths: ``maxlen`` / ``minlen`` count **points**, as DIPY's ``LocalTracking`` does; the functions
``tractfunc.local.deterministic_tracking`` / ``probabilistic_tracking`` (:mod:`tractfunc.local.tracking`)
take mm, as DIPY's functions of those names do.  Seeds are tracked ``chunk_size`` at a time.

State is fixed-shape with an ``alive`` mask (``torch.where``).  With ``early_exit`` (eager mode, the
default) the loop ends once every half has stopped, and the getter and criterion run on the running halves
only (gathered, then scattered back); ``early_exit=False`` (automatic under ``torch.compile`` /
``torch.func``) runs all ``maxlen`` steps without data-dependent Python control flow.  Gradients: see
:mod:`tractfunc.local.getters`.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import numpy as np
import torch

from ..core.arrays import as_tensor
from ..core.tracing import is_tracing
from ..core.tracks import Tracks
from ..errors import TractfuncError
from .criteria import Status, as_criterion, binary_criterion, threshold_criterion  # noqa: F401 (re-exported)

Tensor = torch.Tensor


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


def bidirectional(getter, criterion, p0: Tensor, d0: Tensor, has_dir: Tensor, voxel_size: Tensor, step_size,
                  steps: int, generator: Optional[torch.Generator] = None, early_exit: bool = True,
                  max_points: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both halves from p0 (M, 3) voxel coords along d0 (M, 3), assembled as DIPY does.

    Args:
        has_dir: (M,) bool; rows without a start direction give the one-point streamline [p0] (status
            TRACKPOINT both ways).
        voxel_size: (3,) mm; step_size: mm; steps: steps per half (each half has at most ``steps + 1``
            points).
        max_points: at most this many points per half (DIPY 1.12's ``generate_tractogram`` computes a last
            step and drops its point); None: ``steps + 1``.

    Returns:
        (points (M, L, 3) voxel coords, row i valid below lengths[i]; lengths (M,) int64; status (M, 2)
        int64 end :class:`Status` of the forward and backward halves; seed_index (M,) int64 row of the seed).
    """
    def finish(h: Half) -> Half:
        n = h.n if max_points is None else torch.clamp(h.n, max=max_points)
        return h._replace(n=torch.where(has_dir, n, 1), status=torch.where(has_dir, h.status, int(Status.TRACKPOINT)))
    fwd = finish(track_half(getter, criterion, p0, d0, voxel_size, step_size, steps, generator, early_exit))
    bwd = finish(track_half(getter, criterion, p0, backward_start(fwd, d0), voxel_size, step_size, steps, generator,
                            early_exit))
    pts, lengths = join(fwd, bwd)
    return pts, lengths, torch.stack([fwd.status, bwd.status], -1), bwd.n - 1


def ends_valid(status: Tensor) -> Tensor:
    """(M, 2) end statuses -> (M,) bool: both halves ended in ENDPOINT or OUTSIDEIMAGE (DIPY's valid)."""
    return ((status == Status.ENDPOINT) | (status == Status.OUTSIDEIMAGE)).all(-1)


class LocalTracks(NamedTuple):
    """What :func:`local_tracking` returns, in DIPY's order (by seed, then by peak).

    points: (M, L, 3) in the affine's space, row i valid for i < lengths[i] (padding beyond); lengths: (M,)
    int64 points; seed_ids: (M,) int64 index into the ``seeds`` given of each streamline's seed; status:
    (M, 2) int64 :class:`Status` at the end of the forward and backward halves (TRACKPOINT both for a
    one-point streamline); kept: (M,) bool, what DIPY yields.  In eager mode the rows are exactly the kept
    streamlines (``kept`` all True, every field row-aligned with :meth:`streamlines`); under ``torch.func``
    / ``torch.compile`` (no data-dependent shapes) all rows are returned and ``kept`` marks DIPY's.
    seed_index: (M,) int64 row of the seed point inside each streamline."""
    points: Tensor
    lengths: Tensor
    seed_ids: Tensor
    status: Tensor
    kept: Tensor
    seed_index: Optional[Tensor] = None

    def to_tracks(self) -> Tracks:
        """The kept streamlines packed as :class:`tractfunc.Tracks` (engine "local"; differentiable). For the DIPY
        family a seed may give several streamlines (``max_cross``), so ``reasons`` (A, 2) holds each kept
        streamline's end :class:`Status` codes (forward, backward) and ``accepted`` (A,) is all True."""
        rows = torch.nonzero(self.kept).squeeze(-1)
        valid = torch.arange(self.points.shape[1], device=self.points.device) < self.lengths.unsqueeze(-1)
        sel = valid & self.kept.unsqueeze(-1)
        si = self.seed_index if self.seed_index is not None else torch.zeros_like(self.lengths)
        return Tracks(self.points[sel], self.lengths[rows], self.seed_ids[rows], si[rows], self.status[rows],
                      torch.ones_like(self.kept[rows]), None, "local")

    def streamlines(self) -> List[np.ndarray]:
        """The kept streamlines as a list of (n_i, 3) float64 NumPy arrays (what DIPY yields), aligned with
        ``seed_ids[kept]``."""
        pts = self.points.detach().cpu().numpy()
        ln = self.lengths.cpu().numpy()
        keep = self.kept.cpu().numpy()
        return [pts[i, :ln[i]].astype(np.float64) for i in np.flatnonzero(keep)]


def _voxel_size(affine: np.ndarray) -> np.ndarray:
    lin = affine[:3, :3]
    g = lin.T @ lin
    if not np.allclose(np.triu(g, 1), 0.0, atol=1e-5):
        raise TractfuncError("the affine has shear; DIPY's local tracking needs a regular grid")
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


def resolve_affine(getter, affine) -> np.ndarray:
    """The (4, 4) float64 affine of a tracking run: ``affine`` if given, else the getter's
    (``getter.field.affine``, given to the factory for ``sh_frame="scanner"``), else the identity (seeds
    and streamlines in voxel coordinates).  Both given and different: an error (one affine per run)."""
    own = getattr(getattr(getter, "field", None), "affine", None)
    if affine is None:
        return np.eye(4) if own is None else np.asarray(own, dtype=np.float64)
    A = np.asarray(affine, dtype=np.float64)
    if A.shape != (4, 4):
        raise TractfuncError(f"affine has shape {A.shape}; expected (4, 4)")
    if own is not None and not np.allclose(A, own, rtol=0, atol=1e-9):
        raise TractfuncError("the affine differs from the one the getter was built with; give it once (to the "
                             "getter for sh_frame='scanner', else here)")
    return A


def _pad_cat(xs: List[Tensor], width: int) -> Tensor:
    """Concatenate (M_i, L_i, 3) along rows, zero-padded to L = width."""
    return torch.cat([torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1])) for x in xs])


def local_tracking(getter, criterion, seeds, affine=None, step_size=None, maxlen: int = 500, minlen: int = 2,
                   return_all: bool = True, max_cross: Optional[int] = None, initial_directions=None,
                   generator: Optional[torch.Generator] = None, early_exit: bool = True,
                   chunk_size: int = 20000) -> LocalTracks:
    """DIPY ``LocalTracking(getter, criterion, seeds, affine, step_size, maxlen=500, minlen=2,
    return_all=True, max_cross=None, fixedstep=True)``, batched and chunked.

    Args:
        getter: a direction getter (:mod:`tractfunc.local.getters`, :mod:`tractfunc.local.probabilistic`).
        criterion: a stopping criterion ``pos_vox (B, 3) -> status (B,)`` or a DIPY ``StoppingCriterion``
            (:func:`tractfunc.local.criteria.as_criterion`).
        seeds: (S, 3) in the space of the affine (scanner mm for a NIfTI affine; voxels without one).
        affine: (4, 4); None (default): the getter's (the one given for ``sh_frame="scanner"``), else the
            identity.  Given once: to the getter, or here (both and different: an error).
        step_size: mm, required (as DIPY's).
        maxlen: DIPY ``LocalTracking``'s unit, **points**: each half takes at most ``maxlen`` steps
            (``maxlen + 1`` points with the seed).  ``tractfunc.local.deterministic_tracking`` /
            ``probabilistic_tracking`` take lengths in mm instead, as DIPY's functions of those names.
        minlen: points; with ``return_all=False`` a streamline is kept when ``minlen <= points <= maxlen``
            and both ends reached ENDPOINT or OUTSIDEIMAGE (DIPY).
        return_all: DIPY's (default True: every streamline, one-point ones included).
        max_cross: at most this many seed peaks tracked per seed (default all).
        initial_directions: (S, K, 3) start directions instead of the getter's peaks (zero rows ignored).
        generator: ``torch.Generator`` for sampling getters (consumed chunk by chunk: the same generator
            and ``chunk_size`` give the same output).
        early_exit: stop the step loop once every half has stopped (eager only; automatic off under
            ``torch.func`` / ``torch.compile``).
        chunk_size: seeds tracked at once (bounds memory, as the SD_Stream tracker's ``chunk_size``).

    Returns:
        :class:`LocalTracks` in the affine's space, dtype/device of ``getter.field.sh``; eager: the kept
        streamlines only, ``seed_ids`` aligned with them.
    """
    seeds = as_tensor(seeds)   # NumPy / DLPack arrays accepted, as elsewhere at the public boundary
    dtype, device = getter.field.sh.dtype, getter.field.sh.device
    if seeds.dim() != 2 or seeds.shape[-1] != 3:
        raise TractfuncError(f"seeds have shape {tuple(seeds.shape)}; expected (S, 3)")
    if initial_directions is not None:
        initial_directions = as_tensor(initial_directions).to(dtype=dtype, device=device)
        if initial_directions.dim() != 3 or initial_directions.shape[0] != seeds.shape[0] \
                or initial_directions.shape[-1] != 3:
            raise TractfuncError(f"initial_directions have shape {tuple(initial_directions.shape)}; expected "
                                 f"({seeds.shape[0]}, K, 3), K directions per seed")
    if maxlen < 1 or minlen > maxlen:
        raise TractfuncError(f"need maxlen >= 1 and minlen <= maxlen (points), got maxlen={maxlen}, minlen={minlen}")
    if step_size is None or not float(step_size) > 0:
        raise TractfuncError(f"step_size must be a length > 0 in mm, got {step_size}")
    if int(chunk_size) < 1:
        raise TractfuncError(f"chunk_size must be a positive number of seeds, got {chunk_size}")
    A = resolve_affine(getter, affine)
    crit = as_criterion(criterion, getter.field.sh.shape[:3])
    vs = torch.as_tensor(_voxel_size(A), dtype=dtype, device=device)
    inv = torch.as_tensor(np.linalg.inv(A), dtype=dtype, device=device)
    Af = torch.as_tensor(A, dtype=dtype, device=device)
    seeds = seeds.to(dtype=dtype, device=device)
    tracing = is_tracing(seeds, getter.field.sh)
    parts = []
    for start in range(0, seeds.shape[0], int(chunk_size)):
        sv = seeds[start:start + int(chunk_size)] @ inv[:3, :3].T + inv[:3, 3]
        init = None if initial_directions is None else initial_directions[start:start + int(chunk_size)]
        sid, d0, has_dir = _starts(getter, sv, max_cross, init)
        pts, lengths, status, sidx = bidirectional(getter, crit, sv[sid], d0, has_dir, vs, step_size, maxlen,
                                                   generator, early_exit)
        valid = ends_valid(status) & (lengths >= minlen) & (lengths <= maxlen) & has_dir
        kept = torch.ones_like(valid) if return_all else valid
        if not tracing and bool(kept.all()):   # eager: trimmed to the longest
            pts = pts[:, :max(int(lengths.max()), 1) if lengths.numel() else 1]
        elif not tracing:                      # eager: only DIPY's streamlines, trimmed to the longest
            rows = torch.nonzero(kept).squeeze(-1)
            width = int(lengths[rows].max()) if rows.numel() else 1
            pts, lengths, sid, status, kept, sidx = (pts[rows, :width], lengths[rows], sid[rows], status[rows],
                                                     kept[rows], sidx[rows])
        parts.append((pts @ Af[:3, :3].T + Af[:3, 3], lengths, sid + start, status, kept, sidx))
    if not parts:
        z = torch.zeros(0, dtype=torch.int64, device=device)
        return LocalTracks(torch.zeros(0, 1, 3, dtype=dtype, device=device), z, z, z.reshape(0, 2),
                           z.bool(), z)
    width = max(p[0].shape[1] for p in parts)
    pts = _pad_cat([p[0] for p in parts], width) if len(parts) > 1 else parts[0][0]
    return LocalTracks(pts, *(torch.cat([p[i] for p in parts]) for i in range(1, 6)))
