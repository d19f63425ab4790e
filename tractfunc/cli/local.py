"""``tractfunc track --algorithm closest_peak | det_max | prob | ifod1``: the DIPY family on the command line
(:mod:`tractfunc.local`), reading files through :mod:`tractfunc.io`.  Only :mod:`tractfunc.cli.commands` imports it."""
from __future__ import annotations

import sys
from typing import List

import numpy as np
import torch

from .. import io
from ..core import seeds as S
from ..errors import TractfuncError
from ..local import getters, probabilistic
from ..local.tracker import binary_criterion, local_tracking, threshold_criterion

DEFAULT_STEP = 0.2    # mm; dipy.tracking.tracker.deterministic_tracking's step_size
DEFAULT_ANGLE = 20.0  # degrees; its max_angle


def load_scalar(path: str) -> io.Image:
    """A 3-D scalar map (FA, GFA, ...) as an :class:`tractfunc.io.Image` of float64 (X, Y, Z)."""
    data, A, vox = io.read_image(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise TractfuncError(f"{path}: scalar map has shape {data.shape}; expected a 3-D image")
    data = np.asarray(data, dtype=np.float64)
    if not np.isfinite(data).all():
        raise TractfuncError(f"{path}: scalar map holds NaN/Inf; expected finite values")
    return io.Image(data, A, vox)


def sampling_factory(a):
    """Getter factory for ``--algorithm prob | ifod1`` (same keywords as the deterministic factories):
    ``prob`` is :func:`tractfunc.local.probabilistic.probabilistic`; ``ifod1`` is
    :func:`tractfunc.local.probabilistic.ifod1` with ``--cutoff`` (default 0.1) and no relative threshold,
    and MRtrix3 iFOD1's defaults where the command line leaves them: a 15 degree cone (``--angle``) on the
    2000-vertex Fibonacci sphere (``--sphere default``)."""
    if a.algorithm == "prob":
        return probabilistic.probabilistic
    cutoff = 0.1 if a.cutoff is None else a.cutoff

    def make(sh_volume, **kw):
        kw = {**kw, "pmf_threshold": 0.0, "cutoff": cutoff}
        if a.angle is None:
            kw["max_angle"] = 15.0
        if a.sphere == "default":
            kw["sphere"] = "fibonacci"
        return probabilistic.ifod1(sh_volume, **kw)
    return make


def track_command(a) -> int:
    """``tractfunc track --algorithm closest_peak | det_max | prob | ifod1``: argparse namespace -> tractogram.

    Seeds: ``--seed-points`` (scanner mm) or ``--seed-image`` (``--seeds`` uniform points in its non-zero
    voxels, default 1000, from ``--rng-seed``); one streamline per seed peak (DIPY), the first ``--select``
    kept.  Stopping: ``--fa-map`` with ``--stop-threshold`` (ThresholdStoppingCriterion) or ``--mask``
    (BinaryStoppingCriterion).  The FOD is loaded into the MRtrix3 basis (``--sh-basis`` names the file's);
    ``--sh-frame`` defaults to the API's :data:`tractfunc.local.getters.DEFAULT_SH_FRAME`.  Lengths:
    ``--maxlen`` counts points per half (DIPY ``LocalTracking``); ``--max-length`` / ``--min-length`` (mm),
    when given, become ``int(mm / step)`` points, the conversion DIPY's ``dipy.tracking.tracker`` functions
    make before calling ``LocalTracking``."""
    if bool(a.fa_map) == bool(a.mask):
        raise TractfuncError(f"--algorithm {a.algorithm} stops on --fa-map (with --stop-threshold) or on --mask; "
                             "give exactly one")
    if a.seed_directions:
        raise TractfuncError(f"--algorithm {a.algorithm} starts from the peaks at each seed; --seed-directions "
                             "applies to sd_stream only")
    step = a.step or DEFAULT_STEP
    maxlen = a.maxlen if a.max_length is None else int(a.max_length / step)
    minlen = 2 if a.min_length is None else int(a.min_length / step)
    if maxlen < 1 or minlen > maxlen:
        raise TractfuncError(f"lengths give maxlen={maxlen} and minlen={minlen} points at step {step} mm; expected "
                             "maxlen >= 1 and minlen <= maxlen")
    dtype = {"float32": torch.float32, "float64": torch.float64}[a.dtype]
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    fod = io.load_fod(a.fod, sh_basis=a.sh_basis)
    stop_img = io.load_mask(a.mask) if a.mask else load_scalar(a.fa_map)
    if not io.same_grid(stop_img, fod):
        raise TractfuncError(f"{a.mask or a.fa_map}: grid {stop_img.data.shape} does not match the FOD grid "
                             f"{fod.data.shape[:3]} (same dimensions and affine expected)")
    vol = torch.as_tensor(np.asarray(stop_img.data, dtype=np.float64), dtype=dtype, device=device)
    crit = binary_criterion(vol) if a.mask else threshold_criterion(vol, a.stop_threshold)
    factory = getters.closest_peak if a.algorithm == "closest_peak" else getters.deterministic_maximum
    if a.algorithm in ("prob", "ifod1"):   # sampling getters (tractfunc.local.probabilistic, docs/probabilistic.md)
        factory = sampling_factory(a)
    gen = torch.Generator(device=device).manual_seed(a.rng_seed)
    frame = a.sh_frame or getters.DEFAULT_SH_FRAME
    g = factory(torch.as_tensor(fod.data, dtype=dtype, device=device), max_angle=a.angle or DEFAULT_ANGLE,
                sphere=a.sphere, pmf_threshold=a.pmf_threshold, relative_peak_threshold=a.relative_peak_threshold,
                min_separation_angle=a.min_separation_angle, affine=fod.affine, sh_frame=frame, sh_basis="mrtrix")
    rng = np.random.default_rng(a.rng_seed)
    if a.seed_points:
        pts = io.read_seed_points(a.seed_points)
    else:
        seed_img = io.load_mask(a.seed_image)
        if not seed_img.data.any():
            raise TractfuncError(f"{a.seed_image}: seed image has no non-zero voxel; expected a non-empty seed region")
        pts = S.random_in_mask_np(seed_img.data, seed_img.affine, a.seeds or 1000, rng)
    out: List[np.ndarray] = []
    for start in range(0, len(pts), a.chunk):   # chunk by chunk, so --select can stop early
        if a.select and len(out) >= a.select:
            break
        res = local_tracking(g, crit, torch.as_tensor(pts[start:start + a.chunk], dtype=dtype, device=device),
                             step_size=step, maxlen=maxlen, minlen=minlen, return_all=not a.valid_only,
                             max_cross=a.max_cross, generator=gen, chunk_size=a.chunk)
        out.extend(res.streamlines())
    if a.select:
        out = out[:a.select]
    header = {"method": f"{a.algorithm} (tractfunc, DIPY LocalTracking semantics)", "step_size": step,
              "max_angle": a.angle or DEFAULT_ANGLE, "pmf_threshold": a.pmf_threshold, "source": a.fod}
    io.write_tractogram(a.output, out, fod, header)
    if not a.quiet:
        print(f"{a.output}: {len(out)} streamlines from {len(pts)} seeds")
    sys.stdout.flush()
    return 0
