"""Parity against MRtrix3 ``tckgen -algorithm SD_Stream``: re-track its streamlines from their seeds.

Method: for each streamline ``tckgen`` accepted, take its seed vertex (exact, from the .tck) and the
direction of its first step (forward half: seed -> previous vertex; if the forward half is empty, the
negated backward direction), track with tractfunc from that seed and direction, and compare the two
streamlines by symmetric Hausdorff distance (mm), and for bit identity.

The start direction: tckgen starts each seed's peak search from an unrecorded random direction, and its
first step only tells that direction's peak to about 1e-5 rad (the vertex is rounded to float32), while
SD_Stream flips termination decisions under perturbations far smaller than that.  Two ways around it:

* ``tckgen -seed_direction`` fixes the start direction for every seed (:func:`run_tckgen`
  ``seed_direction=``); then the start is known exactly and the native kernel must reproduce tckgen bit
  for bit (:func:`compare` ``start=``).
* For tckgen's usual random starts, :func:`reconstruct_native` searches for a start direction from which
  tckgen's arithmetic (the native kernel) reproduces the recorded first vertex of both halves exactly,
  and among those, one that reproduces the whole streamline exactly; where no such start is found, the
  first-step direction is used as is.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..core import field as F, params as P
from .. import io
from ..core.sphere import fibonacci_sphere
from ..core.stop import Reason
from ..sdstream.track import track


class Reference(NamedTuple):
    """streamlines: list of (n_i, 3) float32 arrays; seed_index: (S,) seed vertex per streamline;
    seeds: (S, 3) float32 seed points; dirs: (S, 3) float64 unit first-step directions;
    first_fwd / first_bwd: (S, 3) the first vertex of each half (NaN where that half is empty)."""
    streamlines: list
    seed_index: np.ndarray
    seeds: np.ndarray
    dirs: np.ndarray
    first_fwd: np.ndarray
    first_bwd: np.ndarray


def load_reference(tck_path: str, seeds_csv: str) -> Reference:
    import nibabel as nib
    lines = [np.asarray(s, dtype=np.float32) for s in nib.streamlines.load(tck_path).streamlines]
    rows = np.loadtxt(seeds_csv, delimiter=",", comments="#", usecols=(0, 1), ndmin=2).astype(int)
    order = np.argsort(rows[:, 0])
    sidx = rows[order, 1]
    if len(sidx) != len(lines):
        raise io.TractfuncError(f"{seeds_csv}: {len(sidx)} seed rows for {len(lines)} streamlines in {tck_path}")
    seeds = np.stack([t[s] for t, s in zip(lines, sidx)])
    dirs = np.stack([(t[s - 1] - t[s]) if s > 0 else (t[s] - t[s + 1]) for t, s in zip(lines, sidx)]).astype(np.float64)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    nan = np.full(3, np.nan, dtype=np.float32)
    fwd = np.stack([t[s - 1] if s > 0 else nan for t, s in zip(lines, sidx)])
    bwd = np.stack([t[s + 1] if s + 1 < len(t) else nan for t, s in zip(lines, sidx)])
    return Reference(lines, sidx, seeds, dirs, fwd, bwd)


def reconstruct_seed_dirs(fld, prm, msk, ref: Reference, dtype=torch.float32, n_sphere: int = 48,
                          tol_mm: float = 1e-3) -> np.ndarray:
    """Start directions that reproduce tckgen's (unrecorded) seed direction.

    tckgen seeds from a random direction, refines it to a peak, and steps forward along that peak and
    backward along its negation.  Its first step direction is a proxy for that peak (exact up to float32
    rounding for Euler; only approximate with RK4, whose first step averages four stage peaks).  For
    every seed we try candidate start directions -- the first-step direction, the negated first backward
    direction, then (only where those miss by more than ``tol_mm``) a Fibonacci sphere -- take one
    tractfunc step forward and backward from the resulting seed peak, and keep the candidate whose first
    vertices land closest to tckgen's.  Returns (S, 3) unit start directions."""
    from ..sdstream.step import seed_peaks
    from ..core.integrate import iterate

    seeds = torch.as_tensor(ref.seeds, dtype=dtype)
    target_f = torch.as_tensor(ref.first_fwd, dtype=torch.float64)
    target_b = torch.as_tensor(ref.first_bwd, dtype=torch.float64)

    def score(cands: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # cands: (R, K, 3) start directions for seeds `rows` -> (R, K) error in mm
        R, K = cands.shape[:2]
        sp = seeds[rows].unsqueeze(1).expand(R, K, 3).reshape(-1, 3)
        cd = cands.reshape(-1, 3).to(dtype)
        sd = seed_peaks(fld, prm, msk, sp, cd, early_exit=True)
        f = iterate(fld, prm, msk, sp, sd.dir, early_exit=True)
        b = iterate(fld, prm, msk, sp, -sd.dir, early_exit=True)
        tf = target_f[rows].unsqueeze(1).expand(R, K, 3).reshape(-1, 3)
        tb = target_b[rows].unsqueeze(1).expand(R, K, 3).reshape(-1, 3)
        ef = torch.linalg.vector_norm(f.pos.double() - tf, dim=-1)
        eb = torch.linalg.vector_norm(b.pos.double() - tb, dim=-1)
        ef = torch.where(torch.isnan(tf[:, 0]), torch.where(f.reason == 0, torch.full_like(ef, 1e3), torch.zeros_like(ef)), ef)
        eb = torch.where(torch.isnan(tb[:, 0]), torch.where(b.reason == 0, torch.full_like(eb, 1e3), torch.zeros_like(eb)), eb)
        err = ef + eb
        err = torch.where(sd.ok, err, torch.full_like(err, 1e6))
        return torch.nan_to_num(err, nan=1e6).reshape(R, K)

    dirs = torch.as_tensor(ref.dirs, dtype=torch.float64)
    back = target_b - torch.as_tensor(ref.seeds, dtype=torch.float64)
    back = -back / torch.linalg.vector_norm(back, dim=-1, keepdim=True)
    back = torch.where(torch.isnan(back), dirs, back)
    cands = torch.stack([dirs, back], 1)
    rows = torch.arange(len(ref.seeds))
    chunk = 20000
    err = torch.cat([score(cands[rows[i:i + chunk]], rows[i:i + chunk]) for i in range(0, len(rows), chunk)])
    k = err.argmin(1)
    out = cands[rows, k]
    e = err[rows, k]
    miss = torch.nonzero(e > tol_mm).squeeze(1)
    if miss.numel():
        sphere = fibonacci_sphere(n_sphere)
        sc = sphere.unsqueeze(0).expand(miss.numel(), -1, -1)
        err2 = score(sc, miss)
        k2 = err2.argmin(1)
        better = err2[torch.arange(miss.numel()), k2] < e[miss]
        out[miss[better]] = sc[torch.arange(miss.numel()), k2][better]
    return out.numpy()


def hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Hausdorff distance between two polylines' vertex sets (n, 3), (m, 3) in mm (0 at once
    for identical arrays; a k-d tree where SciPy is installed, else all pairwise distances)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape == b.shape and np.array_equal(a, b):
        return 0.0
    try:
        from scipy.spatial import cKDTree
    except ImportError:
        d = torch.cdist(torch.as_tensor(a), torch.as_tensor(b))
        return float(max(d.min(1).values.max(), d.min(0).values.max()))
    return float(max(cKDTree(b).query(a)[0].max(), cKDTree(a).query(b)[0].max()))


def run_tckgen(fod: str, out_tck: str, out_seeds: str, seed_image: str, mask: Optional[str], select: int,
               rk4: bool = False, nthreads: int = 2, extra=(), rng_seed: Optional[int] = None,
               seed_direction=None, seed_option: str = "-seed_image") -> None:
    """Run ``tckgen -algorithm SD_Stream`` (must be on PATH) with ``-output_seeds``.

    seed_option: how ``seed_image`` seeds (``-seed_image``, ``-seed_gmwmi`` ...).
    With ``rng_seed`` set (MRTRIX_RNG_SEED) and ``nthreads=0`` the output is reproducible.
    seed_direction: (3,) start direction of every seed's peak search (``-seed_direction``), or None for
    tckgen's random ones."""
    exe = shutil.which("tckgen")
    if exe is None:
        raise FileNotFoundError("tckgen not found on PATH (install MRtrix3: apt-get install -y mrtrix3)")
    cmd = [exe, fod, out_tck, "-algorithm", "SD_Stream", seed_option, seed_image, "-select", str(select),
           "-output_seeds", out_seeds, "-nthreads", str(nthreads), "-force", "-quiet"]
    if mask:
        cmd += ["-mask", mask]
    if rk4:
        cmd += ["-rk4"]
    if seed_direction is not None:
        cmd += ["-seed_direction", ",".join(repr(float(x)) for x in seed_direction)]
    env = dict(os.environ)
    if rng_seed is not None:
        env["MRTRIX_RNG_SEED"] = str(rng_seed)
    subprocess.run(cmd + list(extra), check=True, env=env)


def _first_step_error(ref: Reference, fwd: np.ndarray, bwd: np.ndarray, rows) -> np.ndarray:
    """Distance (mm) of candidate first vertices (n, 3) from tckgen's, both halves summed, for seeds
    ``rows``; 0 means an exact match (a half that stops at once on one side only costs 1e3)."""
    err = np.zeros(len(rows))
    for mine, theirs in ((fwd, ref.first_fwd[rows]), (bwd, ref.first_bwd[rows])):
        d = np.linalg.norm(mine.astype(np.float64) - theirs, axis=1)
        both_stop = np.isnan(theirs[:, 0]) & np.isnan(mine[:, 0])
        err += np.where(both_stop, 0.0, np.where(np.isnan(d), 1e3, d))
    return err


def _identical(kernel, ref: Reference, rows: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Whether tracking seeds ``rows`` from ``starts`` (n, 3) reproduces tckgen's streamlines bit for bit."""
    v, ln, ids, _, _, _ = kernel.track(ref.seeds[rows], starts)
    same = np.zeros(len(rows), dtype=bool)
    for j, line in zip(ids.tolist(), np.split(v, np.cumsum(ln)[:-1]) if len(ln) else []):
        t = ref.streamlines[rows[j]]
        same[j] = line.shape == t.shape and np.array_equal(line, t)
    return same


def reconstruct_native(kernel, ref: Reference, rounds: int = 12, per_round: int = 32, whole: bool = True,
                       rng_seed: int = 0):
    """Start directions that reproduce tckgen's unrecorded random ones, found with tckgen's own arithmetic
    (a :class:`tractfunc.sdstream.native.Kernel` built with tckgen's parameters).

    Candidates are the first-step direction, the negated first backward step, then ``rounds`` x
    ``per_round`` uniformly random directions per seed not yet reproduced (tckgen draws its start
    uniformly).  Each seed keeps the candidate whose first vertices of both halves come closest to
    tckgen's (an exact match for most seeds); with ``whole``, candidates matching exactly with distinct
    seed peaks are also tracked in full, and one reproducing the whole streamline bit for bit is preferred.
    Returns (dirs (S, 3) float32, first_steps_exact (S,) bool, identical (S,) bool: the whole streamline
    is reproduced from the returned direction)."""
    S = len(ref.seeds)
    rows = np.arange(S)
    back = ref.seeds.astype(np.float64) - ref.first_bwd
    back = back / np.linalg.norm(back, axis=1, keepdims=True)
    back = np.where(np.isnan(back), ref.dirs, back).astype(np.float32)
    dirs = ref.dirs.astype(np.float32)
    err = np.full(S, np.inf)
    for cand in (ref.dirs.astype(np.float32), back):
        _, f, b = kernel.seed_steps(ref.seeds, cand)
        e = _first_step_error(ref, f, b, rows)
        better = e < err
        dirs[better], err[better] = cand[better], e[better]
    identical = _identical(kernel, ref, rows, dirs) if whole else np.zeros(S, dtype=bool)
    rng = np.random.default_rng(rng_seed)
    for _ in range(rounds):
        todo = rows[~identical & (err > 0)] if not whole else rows[~identical]
        if not len(todo):
            break
        K = per_round
        cand = rng.standard_normal((len(todo), K, 3)).astype(np.float32)
        cand /= np.linalg.norm(cand, axis=2, keepdims=True)
        pk, f, b = kernel.seed_steps(np.repeat(ref.seeds[todo], K, 0), cand.reshape(-1, 3))
        e = _first_step_error(ref, f, b, np.repeat(todo, K)).reshape(len(todo), K)
        j = e.argmin(1)
        better = e[np.arange(len(todo)), j] < err[todo]
        dirs[todo[better]] = cand[better, j[better]]
        err[todo[better]] = e[better, j[better]]
        if not whole:
            continue
        # one candidate per distinct seed peak (the start only matters through the peak it converges to)
        hit = e == 0
        pk = pk.reshape(len(todo), K, 3)
        cr, cs = [], []
        for i in np.nonzero(hit.any(1))[0]:
            seen = set()
            for jj in np.nonzero(hit[i])[0]:
                key = pk[i, jj].tobytes()
                if key not in seen:
                    seen.add(key)
                    cr.append(todo[i])
                    cs.append(cand[i, jj])
        if cr:
            cr, cs = np.array(cr), np.array(cs)
            ok = _identical(kernel, ref, cr, cs)
            for r, st in zip(cr[ok], cs[ok]):
                if not identical[r]:
                    identical[r] = True
                    dirs[r] = st
    return dirs, err == 0, identical


class ParityResult(NamedTuple):
    distances: np.ndarray     # (S,) symmetric Hausdorff mm (inf where tractfunc produced no streamline)
    lost: int                 # seeds tractfunc rejected at seeding (outside mask/image, no peak)
    too_short: int            # seeds tracked but ending below the minimum length (a termination flip)
    within_01: float
    within_1: float
    seconds: float
    identical: float = float("nan")   # fraction of streamlines equal to tckgen's bit for bit
    engine: str = ""   # the engine that re-tracked (tractfunc.track)


def compare(ref: Reference, fod_path: str, mask_path: Optional[str], rk4: bool, dtype=torch.float32,
            precomputed: bool = True, reconstruct: bool = True, state_dtype: Optional[torch.dtype] = None,
            start: Optional[np.ndarray] = None, engine: str = "auto", act_path: Optional[str] = None,
            regions=None, crop_at_gmwmi: bool = False, **param_overrides) -> ParityResult:
    """Re-track ``ref``'s seeds with tractfunc in ``dtype`` arithmetic and compare.

    start: (3,) the start direction tckgen was given (``-seed_direction``) -- then no reconstruction; else
    start directions are reconstructed (:func:`reconstruct_native` where the kernel is available, else
    :func:`reconstruct_seed_dirs`) when ``reconstruct``, or the first-step directions are used.
    engine: the engine that re-tracks (:func:`tractfunc.track`; "auto": native for float32, follow for float64).
    state_dtype: the PyTorch engines' state precision (tckgen's: float32; None keeps the full ``dtype``).
    act_path: the 5TT image tckgen was given (``-act``), for ACT's rules and defaults; regions: its ROIs
    (:class:`tractfunc.Regions`: ``-include``, ``-include_ordered``, ``-exclude``, ``-stop``); crop_at_gmwmi: tckgen
    ``-crop_at_gmwmi`` (with ``act_path``)."""
    import time
    from ..sdstream import native
    fod = io.load_fod(fod_path)
    param_overrides["act"] = act_path is not None
    prm = P.resolve(fod.voxel_sizes, rk4=rk4, precomputed=precomputed, state_dtype=state_dtype, **param_overrides)
    act = tis = None
    if act_path:
        tis = io.load_5tt(act_path)
        act = F.make_act(torch.as_tensor(tis.data), tis.affine, tis.voxel_sizes, crop_at_gmwmi)
    fld = F.make_field(torch.as_tensor(fod.data, dtype=dtype), fod.affine, precomputed=precomputed,
                       voxel_sizes=fod.voxel_sizes)
    msk = mimg = None
    if mask_path:
        mimg = io.load_mask(mask_path)
        msk = F.make_mask(torch.as_tensor(mimg.data), mimg.affine, mimg.voxel_sizes)
    t0 = time.time()
    if start is not None:
        dirs = np.tile(np.asarray(start, dtype=np.float64), (len(ref.seeds), 1))
    elif reconstruct and native.available()[0] and precomputed:
        k = native.Kernel(fod.data, fod.affine, P.resolve(fod.voxel_sizes, rk4=rk4, **param_overrides), None,
                          None if mimg is None else mimg.data, None if mimg is None else mimg.affine, 0,
                          fod.voxel_sizes, None if mimg is None else mimg.voxel_sizes,
                          *((None, None, None) if tis is None else tis), regions, crop_at_gmwmi=crop_at_gmwmi)
        dirs = reconstruct_native(k, ref)[0]
    elif reconstruct:
        with torch.no_grad():
            dirs = reconstruct_seed_dirs(fld, prm, msk, ref, dtype)
    else:
        dirs = ref.dirs
    seeds = torch.as_tensor(ref.seeds, dtype=dtype)
    out = track(fld, prm, seeds, torch.as_tensor(np.asarray(dirs), dtype=dtype), mask=msk, engine=engine, act=act,
                regions=regions)
    used = out.engine
    sec = time.time() - t0
    got = {int(i): l.double().numpy() for i, l in zip(out.seed_ids, out.streamlines())}
    H = np.array([hausdorff(got[i], t) if i in got else np.inf for i, t in enumerate(ref.streamlines)])
    same = np.mean([i in got and got[i].shape == t.shape and np.array_equal(got[i].astype(np.float32), t)
                    for i, t in enumerate(ref.streamlines)])
    seed_rejected = int((out.reasons[:, 0] == int(Reason.SEED_REJECTED)).sum())
    return ParityResult(H, seed_rejected, int(len(H) - len(got) - seed_rejected), float((H < 0.1).mean()),
                        float((H < 1.0).mean()), sec, float(same), used)
