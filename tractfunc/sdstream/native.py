"""Native CPU backend of the eager tracker: SD_Stream in single precision, tckgen's arithmetic bit for bit.

:func:`tractfunc.track` (and the CLI) use it for float32 tracking on the CPU without gradients.
It is a small C kernel (``tractfunc/csrc/sd_stream.c``) compiled on first use with the system C compiler
(``$CC``, else ``cc``) into a per-user cache (``$TRACTFUNC_CACHE``, else ``~/.cache/tractfunc``) and loaded
with :mod:`ctypes`; seeds are spread over threads inside the kernel.  Where no compiler is available
:func:`available` says why and the PyTorch tracker is used instead (same semantics, a few times slower,
and not bit-identical to tckgen).

Why a kernel: the PyTorch tracker evaluates the same formulas as tensors, which reorders floating-point
sums; SD_Stream is chaotic at rounding level (a Newton search hovering at its 50-iteration limit ends a
streamline or not depending on the last bit), so only tckgen's exact operation order reproduces tckgen's
streamlines everywhere.  The kernel keeps that order and tckgen's single/double precision mix, and works
in MRtrix3's realigned voxel frame (axes permuted and flipped towards RAS, which sets the order of the
trilinear sum).  The forward pass; the fused engine (:mod:`tractfunc.sdstream.fused`) adds gradients along its decisions.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import platform
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional, Tuple

import numpy as np

from ..core.frames import frame
from ..core import params as P
from ..core.params import TrackParams
from ..errors import TractfuncError

if TYPE_CHECKING:   # torch is imported only by the functions that take tensors
    from ..core.field import ACTField, FODField, MaskField

_SRC = Path(__file__).with_name("csrc") / "sd_stream.c"
_SRC_ADJOINT = Path(__file__).with_name("csrc") / "sd_adjoint.c"   # the fused engine's reverse sweep (fused.py)
# No contraction into fused multiply-adds and no reassociation: every rounding is part of the result.
_CFLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno"]
_ABI = 7
SEED_REJECTED = 6   # tractfunc.core.stop.Reason.SEED_REJECTED (this module does not import torch)
_lib = None
_error: Optional[str] = None

I64x3 = ctypes.c_int64 * 3


class _Volume(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("stride", ctypes.c_int64 * 4), ("dim", I64x3),
                ("nonzero", ctypes.c_void_p), ("nz_stride", I64x3), ("s2v", ctypes.c_double * 12)]


class _Roi(ctypes.Structure):
    _fields_ = [("mask", ctypes.c_void_p), ("dim", I64x3), ("stride", I64x3), ("s2v", ctypes.c_float * 12),
                ("centre", ctypes.c_float * 3), ("radius2", ctypes.c_float)]


class _Config(ctypes.Structure):
    _fields_ = [
        ("fod", _Volume), ("ncoef", ctypes.c_int32), ("lmax", ctypes.c_int32),
        ("mask", _Roi),
        ("al", ctypes.c_void_p), ("al_ndir", ctypes.c_int32), ("al_n", ctypes.c_int32), ("al_inc", ctypes.c_float),
        ("step", ctypes.c_float), ("threshold", ctypes.c_float), ("dot_threshold", ctypes.c_float),
        ("cos_max_angle_ho", ctypes.c_float), ("rk4", ctypes.c_int32),
        ("max_points", ctypes.c_int64), ("min_points", ctypes.c_int64), ("act", _Volume),
        ("include", ctypes.c_void_p), ("n_include", ctypes.c_int32), ("ordered", ctypes.c_void_p),
        ("n_ordered", ctypes.c_int32), ("exclude", ctypes.c_void_p), ("n_exclude", ctypes.c_int32),
        ("stop_on_all_include", ctypes.c_int32), ("unidirectional", ctypes.c_int32),
        ("soft", ctypes.c_int32), ("half_steps", ctypes.c_int64),
        ("crop_at_gmwmi", ctypes.c_int32), ("min_points_postds", ctypes.c_int64), ("max_points_postds", ctypes.c_int64),
        ("min_dist", ctypes.c_float), ("max_dist", ctypes.c_float), ("act_min_vox", ctypes.c_float),
    ]

MAX_ROIS = 64   # of each kind (csrc/sd_stream.c)


class Sphere(NamedTuple):
    """A spherical region (tckgen's ``x,y,z,r``): centre (3,) scanner mm, radius mm."""
    centre: tuple
    radius: float


class ImageRegion(NamedTuple):
    """An image region: data (X, Y, Z) (non-zero = inside), its (4, 4) voxel -> scanner affine, header voxel sizes
    (3,) or None."""
    data: np.ndarray
    affine: np.ndarray
    voxel_sizes: Optional[tuple] = None


class Regions(NamedTuple):
    """tckgen's ROIs: ``include`` (every one must be entered), ``include_ordered`` (entered in this order),
    ``exclude`` (entering one rejects the streamline), each a sequence of :class:`Sphere` / :class:`ImageRegion`;
    ``stop``: a streamline stops once it has entered every include region (tckgen ``-stop``); ``unidirectional``:
    one half from each seed, the seed first (tckgen ``-seed_unidirectional``, which ``include_ordered`` needs)."""
    include: tuple = ()
    include_ordered: tuple = ()
    exclude: tuple = ()
    stop: bool = False
    unidirectional: bool = False


def check_regions(regions: Regions) -> None:
    """TractfuncError (one line) for a sphere with a negative or non-finite radius or centre, an image region that
    is not 3-D, more than MAX_ROIS regions of a kind, or ordered include regions without ``unidirectional``
    (tckgen's rule)."""
    if regions.include_ordered and not regions.unidirectional:
        raise TractfuncError("ordered include regions need unidirectional seeding (tckgen: -include_ordered requires "
                             "-seed_unidirectional)")
    for name in ("include", "include_ordered", "exclude"):
        items = list(getattr(regions, name))
        if len(items) > MAX_ROIS:
            raise TractfuncError(f"at most {MAX_ROIS} {name} regions, got {len(items)}")
        for r in items:
            if isinstance(r, Sphere):
                c = np.asarray(r.centre, dtype=np.float64)
                if c.shape != (3,) or not np.isfinite(c).all() or not (np.isfinite(r.radius) and r.radius >= 0):
                    raise TractfuncError(f"{name} sphere {tuple(c.tolist())}, radius {r.radius}: expected a finite "
                                         "centre x,y,z (mm) and a radius >= 0")
            elif not isinstance(r, ImageRegion) or np.ndim(r.data) != 3:
                raise TractfuncError(f"{name} region: expected a Sphere or a 3-D ImageRegion, got {type(r).__name__}")


def _set_roi(roi: _Roi, region, keep: list) -> None:
    """Fill ``roi`` from a :class:`Sphere` or :class:`ImageRegion` (its arrays appended to ``keep``)."""
    if isinstance(region, Sphere):
        roi.mask = None
        roi.centre[:] = [float(np.float32(x)) for x in region.centre]
        r = np.float32(region.radius)
        roi.radius2 = float(r * r)
        return
    m = np.ascontiguousarray(np.asarray(region.data) != 0, dtype=np.uint8)
    keep.append(m)
    s2v, dims, st, off = frame(region.affine, list(m.shape), list(m.strides), region.voxel_sizes)
    roi.mask = m.ctypes.data + off
    roi.dim[:] = dims
    roi.stride[:] = st
    roi.s2v[:] = s2v.astype(np.float32).reshape(-1).tolist()


def _set_regions(c: _Config, regions: Regions, keep: list) -> None:
    for name, ptr, count in (("include", "include", "n_include"), ("include_ordered", "ordered", "n_ordered"),
                             ("exclude", "exclude", "n_exclude")):
        items = list(getattr(regions, name))
        arr = (_Roi * max(len(items), 1))()
        for roi, region in zip(arr, items):
            _set_roi(roi, region, keep)
        keep.append(arr)
        setattr(c, ptr, ctypes.addressof(arr))
        setattr(c, count, len(items))
    c.stop_on_all_include = int(bool(regions.stop))
    c.unidirectional = int(bool(regions.unidirectional))


def _lmax(n: int) -> int:
    from ..core.shsize import lmax_for
    lmax = lmax_for(n)
    if lmax > 12:
        raise ValueError(f"the native tracker supports lmax <= 12, got {lmax}")
    return lmax


def _default_threads() -> int:
    """torch's intra-op thread count when torch is loaded (so torch.set_num_threads applies), else all CPUs."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else (os.cpu_count() or 1)


def _cache_dir() -> Path:
    root = os.environ.get("TRACTFUNC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tractfunc")
    return Path(root)


def _compile(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise OSError("no C compiler found (set $CC or install gcc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *_CFLAGS, "-o", tmp, str(_SRC), str(_SRC_ADJOINT), "-lm"], capture_output=True,
                           text=True)
        if r.returncode:
            raise OSError(f"{cc} failed: {r.stderr.strip()[:500]}")
        os.replace(tmp, out)   # atomic: concurrent first uses (workers, ranks) never see a partial file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _load():
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    if os.environ.get("TRACTFUNC_NATIVE", "1") == "0":
        _error = "disabled by TRACTFUNC_NATIVE=0"
        return None
    try:
        src = _SRC.read_bytes() + _SRC_ADJOINT.read_bytes()
        # -march=native: key on the CPU too, so a shared home directory never serves another CPU's build
        key = hashlib.sha256(src + " ".join(_CFLAGS).encode() + sys.platform.encode() + platform.machine().encode()
                             + _cpu_flags().encode()).hexdigest()[:16]
        path = _cache_dir() / f"sd_stream-{key}.so"
        if not path.exists():
            _compile(path)
        lib = ctypes.CDLL(str(path))
        lib.sd_abi_version.restype = ctypes.c_int32
        if lib.sd_abi_version() != _ABI:
            raise OSError("stale native library (ABI mismatch)")
        lib.sd_build_al.restype = ctypes.c_float
        lib.sd_build_al.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p]
        lib.sd_al_size.restype = ctypes.c_int32
        lib.sd_track_batch.restype = ctypes.c_int32
        lib.sd_track_batch.argtypes = [ctypes.POINTER(_Config), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_int32]
        lib.sd_track_batch_dirs.restype = ctypes.c_int32
        lib.sd_track_batch_dirs.argtypes = [ctypes.POINTER(_Config), ctypes.c_int64] + [ctypes.c_void_p] * 7 + [
            ctypes.c_int32]
        lib.sd_record_width.restype = ctypes.c_int32
        lib.sd_record_width.argtypes = [ctypes.POINTER(_Config)]
        lib.sd_gather_width.restype = None
        lib.sd_gather_width.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int32]
        lib.sd_gather.restype = None
        lib.sd_gather.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.sd_release.restype = None
        lib.sd_release.argtypes = [ctypes.c_int64, ctypes.c_void_p]
        lib.sd_peaks.restype = None
        lib.sd_peaks.argtypes = [ctypes.POINTER(_Config), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_void_p]
        lib.sd_seed_steps.restype = None
        lib.sd_seed_steps.argtypes = [ctypes.POINTER(_Config), ctypes.c_int64] + [ctypes.c_void_p] * 5
        lib.sd_repack.restype = ctypes.c_int64
        lib.sd_repack.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int32]
        # the fused engine's reverse sweep and exact replay (csrc/sd_adjoint.c; tractfunc.sdstream.fused)
        lib.sd_replay.restype = None
        lib.sd_replay.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 10 + [ctypes.c_int32]
        lib.sd_adjoint.restype = ctypes.c_int32
        lib.sd_adjoint.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 11 + [ctypes.c_int32]
        lib.sd_soft_weights.restype = None
        lib.sd_soft_weights.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_int32]
        lib.sd_stored_width.restype = ctypes.c_int32
        lib.sd_stored_width.argtypes = [ctypes.c_void_p]
        lib.sd_jvp.restype = None
        lib.sd_jvp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 7 + [
            ctypes.c_double, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
        lib.sd_seed_jacobian.restype = None
        lib.sd_seed_jacobian.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 6 + [ctypes.c_int32]
        lib.sd_gmwmi_seeds.restype = None
        lib.sd_gmwmi_seeds.argtypes = [ctypes.POINTER(_Volume), ctypes.c_float, ctypes.c_float, ctypes.c_int64,
                                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.sd_sample.restype = None
        lib.sd_sample.argtypes = [ctypes.POINTER(_Config), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p]
        _lib = lib
    except OSError as e:
        _error = str(e)
    return _lib


def available() -> Tuple[bool, str]:
    """(True, "") when the kernel is built and loaded, else (False, the reason)."""
    return (_load() is not None, _error or "")


def supported(field: "FODField", params: TrackParams, needs_grad: bool) -> bool:
    """Whether :class:`Kernel` can run this job: float32 on the CPU, no gradient, lmax <= 12,
    tckgen's lookup-table peaks (``precomputed``), no peak polishing, float32 (or no) state rounding,
    and a step size that is a number (not a tensor)."""
    import torch
    return (field.sh.dtype == torch.float32 and field.sh.device.type == "cpu" and not needs_grad
            and field.sh.shape[-1] <= 91 and params.precomputed and field.table is not None
            and params.peak_polish == 0 and params.state_dtype in (None, torch.float32)
            and not torch.is_tensor(params.step) and available()[0])


def prepare_volume(data: np.ndarray, threads: int = 0) -> Tuple[np.ndarray, np.ndarray, int]:
    """An FOD array (X, Y, Z, N) of any memory layout (NIfTI loads it coefficient-slowest) -> its float32
    copy with the coefficients contiguous (C order), the (X, Y, Z) uint8 map of voxels holding any
    non-zero coefficient, and the number of voxels holding a NaN/Inf; in one threaded pass."""
    lib = _require()
    data = np.asarray(data, dtype=np.float32)
    out = np.empty(data.shape, dtype=np.float32)
    nz = np.empty(data.shape[:3], dtype=np.uint8)
    st = np.array([s // 4 for s in data.strides], dtype=np.int64)
    dims = np.array(data.shape, dtype=np.int64)
    bad = lib.sd_repack(data.ctypes.data, st.ctypes.data, dims.ctypes.data, out.ctypes.data, nz.ctypes.data,
                        int(threads or os.cpu_count() or 1))
    return out, nz, int(bad)


def _require():
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native tracker unavailable: {_error}")
    return lib


def library():
    """The loaded C library (its functions typed), or RuntimeError saying why it is unavailable."""
    return _require()


# --------------------------------------------------------------------------------------------------
# Tracking


def _point(vol: _Volume, data: np.ndarray, nonzero: np.ndarray, affine: np.ndarray, voxel_sizes) -> None:
    """Point ``vol`` at a (X, Y, Z, K) float32 C-order volume and its (X, Y, Z) uint8 non-zero map (both kept alive
    by the caller), in MRtrix3's realigned frame of the (4, 4) voxel -> scanner ``affine``."""
    dims = list(data.shape[:3])
    s2v, fdims, st, off = frame(affine, dims, [x // 4 for x in data.strides[:3]], voxel_sizes)
    _, _, nst, noff = frame(affine, dims, list(nonzero.strides), voxel_sizes)
    vol.data = data.ctypes.data + 4 * off
    vol.stride[:] = st + [1]
    vol.dim[:] = fdims
    vol.nonzero = nonzero.ctypes.data + noff
    vol.nz_stride[:] = nst
    vol.s2v[:] = s2v.reshape(-1).tolist()


class Kernel:
    """A loaded configuration of the C kernel: the FOD, its non-zero map, the optional mask and the
    parameters, with the arrays kept alive for the C side.  Build once, call :meth:`track` per batch.

    sh: (X, Y, Z, N) float32 SH coefficients, C order (see :func:`prepare_volume`); affine: (4, 4)
    voxel -> scanner mm; nonzero: (X, Y, Z) voxels with any non-zero coefficient (computed if None);
    mask / mask_affine: tracking mask (X', Y', Z') and its own affine, or None; threads: kernel threads
    (0: all CPUs); voxel_sizes / mask_voxel_sizes: the images' header voxel sizes (:func:`frame`);
    act: optional 5TT image (X'', Y'', Z'', 5) (cortical GM, sub-cortical GM, WM, CSF, pathological fractions)
    for anatomically-constrained tracking (tckgen ``-act``), sampled on its own grid (``act_affine``,
    ``act_voxel_sizes``); regions: tckgen's include / exclude ROIs and ``-stop`` (:class:`Regions`); soft_steps:
    None (tckgen's hard stopping) or the steps per half of soft stopping (:class:`tractfunc.Soft`: the cutoff and the
    angle no longer stop, their margins are recorded for the fused engine's survival weights; no ACT or ROIs);
    half_steps: hard stopping's steps per half at most (0: none; a half cut there ends with reason CONTINUE, as
    :func:`tractfunc.track_fixed` cuts at ``n_steps``).
    crop_at_gmwmi: tckgen's ``-crop_at_gmwmi`` with ``act`` (a half entering cortical GM ends on the GM-WM interface).
    :meth:`from_field` builds one from the PyTorch containers."""

    def __init__(self, sh: np.ndarray, affine: np.ndarray, params: TrackParams, nonzero: Optional[np.ndarray] = None,
                 mask: Optional[np.ndarray] = None, mask_affine: Optional[np.ndarray] = None, threads: int = 0,
                 voxel_sizes=None, mask_voxel_sizes=None, act: Optional[np.ndarray] = None,
                 act_affine: Optional[np.ndarray] = None, act_voxel_sizes=None, regions: Optional[Regions] = None,
                 soft_steps: Optional[int] = None, half_steps: int = 0, crop_at_gmwmi: bool = False):
        lib = _require()
        self.lib = lib
        if not (sh.dtype == np.float32 and sh.flags["C_CONTIGUOUS"]):
            sh, nonzero, _ = prepare_volume(sh, threads)
        if nonzero is None:
            nonzero = (sh != 0).any(-1)
        nz = np.ascontiguousarray(nonzero, dtype=np.uint8)
        self._keep = [sh, nz]
        c = _Config()
        _point(c.fod, sh, nz, affine, voxel_sizes)
        c.ncoef = sh.shape[3]
        c.lmax = _lmax(sh.shape[3])
        if mask is not None:
            _set_roi(c.mask, ImageRegion(mask, mask_affine, mask_voxel_sizes), self._keep)
        if regions is not None:
            check_regions(regions)
        _set_regions(c, regions or Regions(), self._keep)
        if act is not None:   # a 5TT image: tckgen's ACT rules
            data, anz, _ = prepare_volume(np.asarray(act, dtype=np.float32), threads)
            self._keep += [data, anz]
            _point(c.act, data, anz, act_affine, act_voxel_sizes)
            c.act_min_vox = min(_spacing(act_affine, act_voxel_sizes))
            c.crop_at_gmwmi = int(bool(crop_at_gmwmi))
            c.min_points_postds, c.max_points_postds = P.measured_points(params)
            c.min_dist, c.max_dist = params.min_length, params.max_length
        ndir = 512
        al = np.zeros(ndir * lib.sd_al_size(c.lmax), dtype=np.float32)
        self._keep.append(al)
        c.al_inc = lib.sd_build_al(c.lmax, ndir, al.ctypes.data)
        c.al, c.al_ndir, c.al_n = al.ctypes.data, ndir, lib.sd_al_size(c.lmax)
        c.step, c.threshold = params.step, params.cutoff
        c.dot_threshold = params.cos_angle_step
        c.cos_max_angle_ho = params.cos_angle_rk4
        c.rk4 = int(params.rk4)
        c.max_points, c.min_points = params.max_points, params.min_points
        if soft_steps is not None:
            if act is not None or (regions is not None and regions != Regions()):
                raise TractfuncError("soft stopping runs without ACT or ROIs (they stop hard)")
            c.soft, c.half_steps = 1, int(soft_steps)
        elif half_steps:
            c.half_steps = int(half_steps)
        self.config = c
        self.threads = threads

    @classmethod
    def from_field(cls, field: "FODField", params: TrackParams, mask: Optional["MaskField"] = None,
                   threads: int = 0, act: Optional["ACTField"] = None, regions: Optional[Regions] = None,
                   soft_steps: Optional[int] = None, half_steps: int = 0) -> "Kernel":
        """From the PyTorch containers (:func:`tractfunc.make_field` / :func:`tractfunc.make_mask`;
        ``act``: a 5TT image as :func:`tractfunc.make_act` builds it); the FOD tensor is used in place (no copy)."""
        import torch

        def affine(f):
            return torch.linalg.inv(f.world_to_voxel.double().cpu()).numpy()

        m = ma = None
        if mask is not None:
            m, ma = mask.mask.cpu().numpy(), affine(mask)
        sh = field.sh.detach().contiguous().numpy()
        tis = None if act is None else act.tissues.detach().float().cpu().numpy()
        return cls(sh, affine(field), params, field.nonzero.cpu().numpy(), m, ma, threads, field.voxel_sizes,
                   None if mask is None else mask.voxel_sizes, tis, None if act is None else affine(act),
                   None if act is None else act.voxel_sizes, regions, soft_steps, half_steps,
                   crop_at_gmwmi=act is not None and act.crop_at_gmwmi)

    def track(self, seeds: np.ndarray, dirs: np.ndarray, threads: int = 0, record: bool = False):
        """Track seeds (S, 3) float32 scanner mm from start directions (S, 3) float32.

        Returns (vertices (V, 3) float32 streamline after streamline in tckgen order, lengths (A,),
        accepted seed rows (A,), seed vertex index (A,), reasons (S, 2) int64, accepted (S,) bool), and with
        ``record`` also each vertex's step record (V, w) float32, what the adjoint needs
        (:mod:`tractfunc.sdstream.fused`): Euler w = 3, the peak the step moved along; RK4 w = 12, the four stage
        peaks; the seed vertex holds the seed peak (negated for a unidirectional streamline: its one half starts
        from the negated record, as the second half of a two-sided one).  With soft stopping Euler w = 5 (the peak, the amplitude margin, the cosine
        margin; the seed vertex holds the seed peak) and RK4 w = 18 (the stage peaks, the peak at the new vertex,
        the two margins, the stage of the smallest amplitude).
        Memory follows the streamlines traced (each grows as it is tracked), not ``max_points``; MemoryError
        when they do not fit."""
        seeds = np.ascontiguousarray(seeds, dtype=np.float32)
        dirs = np.ascontiguousarray(dirs, dtype=np.float32)
        S = len(seeds)
        threads = threads or self.threads or _default_threads()
        lines = np.zeros(S, dtype=np.uintp)   # the C side's malloc'd streamlines (float *)
        lengths = np.zeros(S, dtype=np.int64)
        sidx = np.zeros(S, dtype=np.int64)
        reasons = np.zeros((S, 2), dtype=np.int32)
        dlines = np.zeros(S, dtype=np.uintp) if record else None
        rc = self.lib.sd_track_batch_dirs(ctypes.byref(self.config), S, seeds.ctypes.data, dirs.ctypes.data,
                                          lines.ctypes.data, None if dlines is None else dlines.ctypes.data,
                                          lengths.ctypes.data, sidx.ctypes.data, reasons.ctypes.data, int(threads))
        if rc == -2:
            raise MemoryError(f"out of memory tracking {S} seeds (streamlines longer than memory allows; "
                              "a smaller --chunk or --max-length bounds them)")
        width = self.lib.sd_record_width(ctypes.byref(self.config))
        try:
            verts = np.empty((int(lengths.sum()), 3), dtype=np.float32)
            sdirs = np.empty((verts.shape[0], width), dtype=np.float32) if record else None
        except MemoryError:
            self.lib.sd_release(S, lines.ctypes.data)
            if record:
                self.lib.sd_release(S, dlines.ctypes.data)
            raise
        self.lib.sd_gather(S, lines.ctypes.data, lengths.ctypes.data, verts.ctypes.data)
        if record:
            self.lib.sd_gather_width(S, dlines.ctypes.data, lengths.ctypes.data, sdirs.ctypes.data, width)
        acc = lengths > 0
        out = (verts, lengths[acc], np.nonzero(acc)[0], sidx[acc], reasons.astype(np.int64), acc)
        return out + (sdirs,) if record else out

    def seed_steps(self, seeds: np.ndarray, dirs: np.ndarray):
        """tckgen's seed peak and first vertex of each half from start directions: seeds, dirs (n, 3) ->
        (peak (n, 3), fwd (n, 3), bwd (n, 3)) float32, NaN where rejected or stopped at the first step."""
        seeds = np.ascontiguousarray(seeds, dtype=np.float32)
        dirs = np.ascontiguousarray(dirs, dtype=np.float32)
        pk, f, b = (np.empty((len(seeds), 3), dtype=np.float32) for _ in range(3))
        self.lib.sd_seed_steps(ctypes.byref(self.config), len(seeds), seeds.ctypes.data, dirs.ctypes.data,
                               pk.ctypes.data, f.ctypes.data, b.ctypes.data)
        return pk, f, b

    def peaks(self, sh_rows: np.ndarray, dirs: np.ndarray):
        """Newton peak search alone: sh_rows (n, N) float32, dirs (n, 3) -> (peak dirs (n, 3), amps (n,))."""
        sh_rows = np.ascontiguousarray(sh_rows, dtype=np.float32)
        u = np.array(dirs, dtype=np.float32, order="C", copy=True)
        amp = np.empty(len(u), dtype=np.float32)
        self.lib.sd_peaks(ctypes.byref(self.config), len(u), sh_rows.ctypes.data, u.ctypes.data, amp.ctypes.data)
        return u, amp

    def sample(self, pos: np.ndarray):
        """FOD sampling alone: pos (n, 3) scanner mm -> (values (n, N) float32, inside (n,) bool)."""
        pos = np.ascontiguousarray(pos, dtype=np.float32)
        vals = np.zeros((len(pos), self.config.ncoef), dtype=np.float32)
        inside = np.zeros(len(pos), dtype=np.uint8)
        self.lib.sd_sample(ctypes.byref(self.config), len(pos), pos.ctypes.data, vals.ctypes.data, inside.ctypes.data)
        return vals, inside.astype(bool)


# --------------------------------------------------------------------------------------------------
# GM-WM interface seeding (tckgen -seed_gmwmi)


def _spacing(affine: np.ndarray, voxel_sizes=None) -> list:
    """An image's voxel sizes (3,) mm: the header's, else the lengths of the affine's columns."""
    if voxel_sizes is not None:
        return [float(v) for v in list(voxel_sizes)[:3]]
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0).tolist()


def gmwmi_seeder(tissues: np.ndarray, affine: np.ndarray, voxel_sizes, image: np.ndarray, image_affine: np.ndarray,
                 threads: int = 0):
    """tckgen's ``-seed_gmwmi IMAGE`` (with ``-act 5TT``): ``draw(n, gen) -> (n, 3) float32`` scanner-mm seeds on the
    GM-WM interface.

    Each candidate is drawn from ``image`` (X', Y', Z') (probability proportional to its values, uniform within the
    voxel: :func:`tractfunc.core.seeds.weighted_in_image_np`), moved onto the interface of the 5TT ``tissues``
    (X, Y, Z, 5) (``affine``, ``voxel_sizes``: its grid), shifted uniformly within the interface's tangent plane by up
    to +-2 mean voxel sizes along each of two axes, and moved onto the interface again; candidates that fail a stage
    are redrawn (tckgen's loop).  ``gen``: a :class:`numpy.random.Generator`."""
    from ..core.seeds import weighted_in_image_np
    lib = _require()
    data, nz, _ = prepare_volume(np.asarray(tissues, dtype=np.float32), threads)
    vol = _Volume()
    _point(vol, data, nz, affine, voxel_sizes)
    sp = _spacing(affine, voxel_sizes)
    min_vox = float(np.float32(min(sp)))
    perturb = float(np.float32(4.0) * np.float32(np.float32(sp[0] * sp[1] * sp[2]) ** np.float32(1.0 / 3.0)))
    weighted_in_image_np(image, image_affine, 1, np.random.default_rng(0))   # ValueError for an unusable image

    def draw(n: int, gen: np.random.Generator) -> np.ndarray:
        out, got, tried = np.empty((n, 3), dtype=np.float32), 0, 0
        while got < n:
            m = max(2 * (n - got), 64)
            pts = np.ascontiguousarray(weighted_in_image_np(image, image_affine, m, gen), dtype=np.float32)
            uv = np.ascontiguousarray(gen.random((m, 2), dtype=np.float32))
            ok = np.zeros(m, dtype=np.uint8)
            lib.sd_gmwmi_seeds(ctypes.byref(vol), min_vox, perturb, m, pts.ctypes.data, uv.ctypes.data,
                               ok.ctypes.data)
            kept = pts[ok.astype(bool)][: n - got]
            out[got:got + len(kept)] = kept
            got, tried = got + len(kept), tried + m
            if not got and tried >= 100000:   # tckgen would loop for ever
                raise ValueError("no point of the seed image leads to the GM-WM interface of the 5TT image")
        return out

    draw.keep = (data, nz, vol)   # the arrays the C side reads
    return draw
