"""The fused follow engine: the native kernel's forward, one C reverse sweep for the gradient.

What :mod:`tractfunc.sdstream.follow` computes with the PyTorch primitives step after step, this module computes
in C (``csrc/sd_adjoint.c``), with the same decisions and the same derivative rules:

* **forward**: the native kernel tracks (tckgen's decisions) and records each step's peak directions (Euler: the
  peak; RK4: the four stage peaks).  With tckgen's settings (lookup-table peaks, no polish) on float32 the
  vertices are the kernel's, tckgen's bit for bit.  With exact peaks (``params.peak_polish > 0``, e.g.
  ``resolve(..., exact=True)``) every peak is polished to the exact maximum of the exactly evaluated SH series in
  double precision, from the recorded direction, along the same decisions (``sd_replay``): the follow engine's
  values, in float64 or rounded to float32.  With tckgen's settings on float64 the replay runs tckgen's peak search
  (lookup table, Newton, tolerance) in double from the starts of its reference (:mod:`~.follow` with hard stopping,
  :func:`tractfunc.track_fixed` with soft stopping: the search's answer depends on its start by ~1e-6 rad).
* **backward**: one reverse sweep per streamline (``sd_adjoint``), O(vertices x coefficients), no Newton
  iterations and no autograd graph: each peak's derivative is the implicit-function one
  (:mod:`tractfunc.core.implicit`), scattered into the 8 voxels of its trilinear sample (one dense gradient
  buffer per thread, of which only touched voxels are reduced), RK4 by the chain rule through its four stages.
  Saved for backward: the vertices and the step records, 24 (Euler) to 60 (RK4) bytes per vertex with tckgen's
  settings in float32, 48 (Euler) to 96 (RK4, its four stage peaks packed: two components each) in double; soft
  stopping adds the margins per step (Euler: 16 bytes more in double; RK4: the peak at the new vertex, the
  amplitude margin and the minimal stage, 24 more) and the weights (8).

The decisions are locally constant, so they pass no derivative (as in every engine; soft stopping's weights carry
the derivative of its margins).  Reached through :func:`tractfunc.track` (``engine="follow"``, which "auto" picks
for differentiable CPU runs); the PyTorch :func:`tractfunc.sdstream.follow.follow` and
:func:`tractfunc.track_fixed` stay the references it is tested against (tests/sdstream/test_fused.py).  Under plain
autograd and ``torch.func.grad`` / ``vjp`` (the op unwraps to plain tensors); under ``vmap`` and ``torch.compile``
through :func:`tractfunc.follow_fixed` (custom ops, :mod:`tractfunc.sdstream.ops`), and
:func:`tractfunc.seed_jacobian_packed` gives per-vertex seed Jacobians in C.  Forward mode (``torch.func.jvp``) is one C
sweep too (``sd_jvp``, :func:`jvp`: the same derivative rules, propagated forward).
"""
from __future__ import annotations

import ctypes
import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..core.field import FODField
from ..core.params import TrackParams
from ..core.shsize import lmax_for
from ..core.tracing import live_tangent, needs_grad, unwrap
from . import native

Tensor = torch.Tensor

POLISH_MAX = 8   # exact Newton iterations per replayed peak at most (it stops at a move below 1e-15 rad)


class _AdjConfig(ctypes.Structure):
    _fields_ = [("fod", ctypes.c_void_p), ("fod_double", ctypes.c_int32), ("dim", ctypes.c_int64 * 3),
                ("ncoef", ctypes.c_int32), ("lmax", ctypes.c_int32), ("nonzero", ctypes.c_void_p),
                ("w2v", ctypes.c_double * 12), ("step", ctypes.c_double), ("rk4", ctypes.c_int32),
                ("polish", ctypes.c_int32), ("soft", ctypes.c_int32), ("temperature", ctypes.c_double),
                ("cutoff", ctypes.c_double), ("cos_max", ctypes.c_double), ("lut", ctypes.c_void_p),
                ("lut_inc", ctypes.c_double), ("lut_ndir", ctypes.c_int32), ("lut_l1", ctypes.c_int32),
                ("pack", ctypes.c_int32), ("own_starts", ctypes.c_int32)]


def applies(field: FODField, params: TrackParams) -> bool:
    """Whether the fused engine can run a follow job on ``field``: :func:`tractfunc.sdstream.engine.fused_fits` (the
    CPU, lmax <= 12, float32 or float64, and exact peaks, or tckgen's lookup-table peaks with a float32 field or a
    float64 state) on this field's and these params' values."""
    from .engine import fused_fits, settings
    return fused_fits(settings(field, params))


class _Tape(NamedTuple):
    """What the reverse sweep reads: the config (and the arrays it points into), the packed rows, the forward's
    vertices and step records (double, or the kernel's float32: :func:`_double` converts) and, with soft stopping,
    the survival weights (double; else None)."""
    config: _AdjConfig
    keep: tuple
    starts: np.ndarray
    lengths: np.ndarray
    seed_index: np.ndarray
    verts: np.ndarray
    sdirs: np.ndarray
    weights: Optional[np.ndarray] = None


def _config(field: FODField, params: TrackParams, temperature: Optional[float] = None) -> tuple:
    """The C config of a fused call and the arrays it points into (keep them alive while it is used): the
    lookup table in double for a float64 field with tckgen's peaks (:func:`_replays_lut`)."""
    sh = field.sh.detach()
    nz = field.nonzero.to(torch.uint8).contiguous()
    c = _AdjConfig()
    c.fod = sh.data_ptr()
    c.fod_double = int(sh.dtype == torch.float64)
    c.dim[:] = list(sh.shape[:3])
    c.ncoef = sh.shape[3]
    c.lmax = lmax_for(sh.shape[3])
    c.nonzero = nz.data_ptr()
    c.w2v[:] = field.world_to_voxel.double().cpu()[:3].reshape(-1).tolist()
    c.step = float(params.step.detach()) if torch.is_tensor(params.step) else float(params.step)
    c.rk4 = int(params.rk4)
    c.polish = max(POLISH_MAX, int(params.peak_polish))
    if temperature is not None:
        c.soft, c.temperature, c.cutoff = 1, float(temperature), float(params.cutoff)
        c.cos_max = float(params.cos_angle_rk4 if params.rk4 else params.cos_angle_step)
    keep = (sh, nz)
    if _replays_lut(field, params):
        tab = np.ascontiguousarray(field.table.table.detach().cpu().numpy(), dtype=np.float64)   # (ndir, L+1, L+1)
        if tab.ndim != 3 or tab.shape[1] != tab.shape[2] or tab.shape[1] < c.lmax + 1 or tab.shape[0] < 2:
            raise ValueError(f"Legendre table of shape {tab.shape} for lmax {c.lmax}")
        c.lut, c.lut_inc = _ptr(tab), float(field.table.inc)
        c.lut_ndir, c.lut_l1 = tab.shape[0], tab.shape[1]
        keep = keep + (tab,)
    return c, keep


def replays(field: FODField, params: TrackParams) -> bool:
    """Whether the fused forward recomputes the kernel's streamlines (exact peaks, or tckgen's peak search in float64)
    rather than returning the kernel's own float32 vertices (tckgen's settings in float32)."""
    return params.peak_polish > 0 or _replays_lut(field, params)


def _replays_lut(field: FODField, params: TrackParams) -> bool:
    """Values recomputed in double with tckgen's peak search (a float64 field, tckgen's lookup-table peaks); float32
    with tckgen's settings keeps the kernel's own values, exact peaks are polished instead."""
    return params.peak_polish == 0 and field.sh.dtype == torch.float64 and field.table is not None


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _double(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64)


class _Fused(torch.autograd.Function):
    """(sh, seeds (S, 3), step (0-d) or None, init_dirs, field, params, kernel, temperature) -> (vertices (V, 3),
    weights (V,) (empty for hard stopping), lengths, seed_ids, seed_index, reasons, accepted, tape, the kernel's
    vertices (V, 3) float32): the kernel and the replay run in forward (on plain tensors, also under ``torch.func.grad`` / ``vjp``, which unwrap them), the C
    reverse sweep in backward."""

    @staticmethod
    def forward(sh, seeds, step, init_dirs, field, params, kernel, temperature):
        prm = params if step is None else params._replace(step=step)
        values, weights, tape, ids, reasons, acc, decided = forward(field._replace(sh=sh), prm, kernel, seeds,
                                                                     init_dirs, temperature)
        w = weights if weights is not None else values.new_zeros(0)
        return (values, w, torch.from_numpy(tape.lengths), ids, torch.from_numpy(tape.seed_index), reasons, acc,
                tape, decided)

    @staticmethod
    def setup_context(ctx, inputs, output):
        sh, seeds, step = inputs[:3]
        ctx.tape, ctx.ids = output[7], output[3]
        # the returned vertices, weights and packing share memory with the tape: saving them makes autograd refuse a
        # backward after an in-place change instead of sweeping changed data
        ctx.save_for_backward(*output[:5])
        ctx.meta = (sh.dtype, seeds.dtype, seeds.shape[0], step is not None)
        ctx.mark_non_differentiable(*output[2:7], output[8])

    @staticmethod
    def jvp(ctx, t_sh, t_seeds, t_step, *_unused):
        """Forward mode (``torch.func.jvp``): one C forward-mode sweep along the tape."""
        with torch._C._DisableFuncTorch():   # plain tensors for C
            sh_dtype, seeds_dtype, S, has_step = ctx.meta
            t_sh = unwrap(t_sh) if live_tangent(t_sh) else None
            ts = unwrap(t_seeds)[ctx.ids] if t_seeds is not None else torch.zeros(ctx.ids.shape[0], 3)
            dv, dw = jvp(ctx.tape, t_sh, ts, float(unwrap(t_step)) if t_step is not None else 0.0)
            tw = dw.to(sh_dtype) if dw is not None else torch.zeros(0, dtype=sh_dtype)
            return (dv.to(sh_dtype), tw) + (None,) * 7

    @staticmethod
    def backward(ctx, gv, gw, *_unused):
        with torch._C._DisableFuncTorch():   # plain tensors for C (torch.func.grad / vjp wrap the cotangent)
            return _Fused._sweep(ctx, unwrap(gv), None if gw is None else unwrap(gw))

    @staticmethod
    def _sweep(ctx, gv, gw):
        t: _Tape = ctx.tape
        sh_dtype, seeds_dtype, S, has_step = ctx.meta
        gsh = torch.zeros_like(t.keep[0]) if ctx.needs_input_grad[0] else None
        gseeds, gstep = adjoint(t, gv, gw, gsh)
        g_seeds = None
        if ctx.needs_input_grad[1]:
            g_seeds = torch.zeros(S, 3, dtype=seeds_dtype).index_add_(0, ctx.ids, torch.from_numpy(gseeds).to(
                seeds_dtype))
        g_step = torch.tensor(gstep, dtype=sh_dtype) if has_step and ctx.needs_input_grad[2] else None
        return gsh, g_seeds, g_step, None, None, None, None, None


def saved_bytes(tracks_vertices: Tensor, tracks_weights: Optional[Tensor] = None) -> Optional[tuple]:
    """What a fused forward keeps for its backward, from its output: (bytes in all, bytes beyond the returned
    vertices and weights) of the vertices, step records and weights it holds (the packed rows' index arrays, 24
    bytes per streamline, aside), or None when ``tracks_vertices`` did not come from the fused engine with a graph."""
    tapes, todo, seen = [], [tracks_vertices.grad_fn], set()
    while todo:   # the fused nodes behind the output (one per chunk of seeds, joined by torch.cat)
        node = todo.pop()
        if node is None or id(node) in seen or len(seen) > 1000:
            continue
        seen.add(id(node))
        tape = getattr(node, "tape", None)
        if isinstance(tape, _Tape):
            tapes.append(tape)
        else:
            todo.extend(n for n, _ in node.next_functions)
    if not tapes:
        return None
    held = [a for t in tapes for a in (t.verts, t.sdirs, t.weights) if a is not None]
    outs = [t.detach().numpy() for t in (tracks_vertices, tracks_weights) if t is not None and t.numel()]
    total = sum(a.nbytes for a in held)
    return total, total - sum(a.nbytes for a in held if any(np.shares_memory(a, o) for o in outs))


def adjoint(tape: _Tape, gv: Tensor, gw: Optional[Tensor], gsh: Optional[Tensor]):
    """One C reverse sweep over the tape's streamlines.

    Args:
        tape: what :func:`forward` recorded; gv: (V, 3) dL/dvertices; gw: (V,) dL/dweights or None (ignored under
            hard stopping); gsh: None, or a zeroed tensor like the FOD that receives dL/dFOD.
    Returns:
        (dL/dseed of each accepted streamline (A, 3) float64 NumPy, dL/dstep float).
    """
    lib = native.library()
    gverts = np.ascontiguousarray(gv.detach().cpu().numpy(), dtype=np.float64)
    gweights = None
    if tape.weights is not None and gw is not None and gw.numel():
        gweights = np.ascontiguousarray(gw.detach().cpu().numpy(), dtype=np.float64)
    A = tape.lengths.shape[0]
    gseeds = np.zeros((A, 3), dtype=np.float64)
    gstep = np.zeros(1, dtype=np.float64)
    verts, sdirs = _double(tape.verts), _double(tape.sdirs)   # (held: the C call reads them)
    rc = lib.sd_adjoint(ctypes.byref(tape.config), A, _ptr(tape.starts), _ptr(tape.lengths), _ptr(tape.seed_index),
                        _ptr(verts), _ptr(sdirs), _ptr(gverts), None if gweights is None else _ptr(tape.weights),
                        None if gweights is None else _ptr(gweights), _ptr(gseeds), _ptr(gstep),
                        None if gsh is None else gsh.data_ptr(), torch.get_num_threads())
    if rc == -2:
        raise MemoryError("out of memory for the per-thread FOD gradient buffers (fewer threads need less)")
    return gseeds, float(gstep[0])


def forward(field: FODField, params: TrackParams, kernel: "native.Kernel", seeds: Tensor, init_dirs: Tensor,
            temperature: Optional[float] = None, own_starts: bool = False):
    """The kernel's decisions and the forward values on plain tensors -> (values (V, 3) in the field's dtype, weights
    (V,) or None, tape (what :func:`adjoint` reads), ids, reasons, accepted, the kernel's own vertices (V, 3) float32)
    (see :func:`track_fused`).

    own_starts: with tckgen's peaks in float64, start every peak search where :func:`tractfunc.track_fixed` does
    (from the incoming direction; the seed peak from ``init_dirs``) rather than where :mod:`~.follow` does (always so
    under soft stopping): the search's answer depends on its start by ~1e-6 rad."""
    s32 = seeds.detach().to("cpu", torch.float32).numpy()
    d32 = init_dirs.detach().to("cpu", torch.float32).numpy()
    v32, ln, ids, si, reasons, acc, sd32 = kernel.track(s32, d32, record=True)
    starts = np.ascontiguousarray(np.cumsum(ln) - ln, dtype=np.int64)
    ln, si = np.ascontiguousarray(ln, dtype=np.int64), np.ascontiguousarray(si, dtype=np.int64)
    config, keep = _config(field, params, temperature)
    if params.peak_polish > 0 or config.lut:
        seeds_acc = np.ascontiguousarray(seeds.detach().cpu().double().numpy()[ids])
        sd32 = np.ascontiguousarray(sd32)
        verts = np.empty((v32.shape[0], 3), dtype=np.float64)
        config.pack = 1   # RK4's double records packed (csrc/sd_adjoint.c: stored_width)
        sdirs = np.empty((sd32.shape[0], native.library().sd_stored_width(ctypes.byref(config))), dtype=np.float64)
        ok = np.ones(ln.shape[0], dtype=np.uint8)
        v32 = np.ascontiguousarray(v32)
        init = None
        config.own_starts = int(own_starts or temperature is not None)
        if config.lut and config.own_starts:   # the seed peaks are searched again, from the start directions
            d = init_dirs.detach().cpu().double()[torch.from_numpy(ids).long()]
            init = np.ascontiguousarray((d / torch.linalg.vector_norm(d, dim=-1, keepdim=True)).numpy())
        native.library().sd_replay(ctypes.byref(config), ln.shape[0], _ptr(starts), _ptr(ln), _ptr(si),
                                   _ptr(seeds_acc), None if init is None else _ptr(init), _ptr(sd32), _ptr(v32),
                                   _ptr(verts), _ptr(sdirs),
                                   _ptr(ok), torch.get_num_threads())
        values = torch.from_numpy(verts).to(field.sh.dtype)
        if config.lut and not ok.all():
            warnings.warn(f"{int((ok == 0).sum())} streamline(s) could not take every step of the native kernel's "
                          f"decisions in float64 (a peak search failed or a step left the image)")
    else:   # kept in float32 until a sweep needs them (12 + 12 or 48 bytes per vertex between forward and backward)
        verts, sdirs = v32, sd32
        values = torch.from_numpy(v32)
    w = None
    if temperature is not None:   # survival weights from the recorded (or replayed) margins
        rec = _double(sdirs)
        w = np.empty(verts.shape[0], dtype=np.float64)
        native.library().sd_soft_weights(ctypes.byref(config), ln.shape[0], _ptr(starts), _ptr(ln), _ptr(si),
                                         _ptr(rec), _ptr(w), torch.get_num_threads())
    tape = _Tape(config, keep, starts, ln, si, verts, sdirs, w)
    weights = None if w is None else torch.from_numpy(w).to(field.sh.dtype)
    return (values, weights, tape, torch.from_numpy(ids).to(torch.long), torch.from_numpy(reasons),
            torch.from_numpy(acc), torch.from_numpy(v32))


def track_fused(field: FODField, params: TrackParams, kernel: "native.Kernel", seeds: Tensor, init_dirs: Tensor,
                temperature: Optional[float] = None, decided: Optional[list] = None):
    """Track with the kernel's decisions; values and gradients as :mod:`tractfunc.sdstream.follow`'s.

    Args:
        field: the FOD (C-contiguous, on the CPU; :func:`tractfunc.core.field.tracking_field`), in the dtype of
            the result; ``field.sh`` may require grad.
        params: its parameters (``params.step`` may be a tensor requiring grad); :func:`applies` must hold.
        kernel: the decision kernel (:func:`tractfunc.sdstream.track.decision_kernel`).
        seeds: (S, 3) scanner mm (may require grad); init_dirs: (S, 3) start directions.
        temperature: None (hard stopping) or soft stopping's T; the kernel must then have been built with
            ``soft_steps`` (the steps per half).
        decided: a list that receives the kernel's own vertices (V, 3) float32 (its ``-crop_at_gmwmi`` decisions
            for :func:`tractfunc.sdstream.act.crop_ends`), or None.
    Returns:
        (vertices (V, 3) in the field's dtype, differentiable wrt ``field.sh``, ``seeds`` and a tensor step;
        lengths (A,), seed_ids (A,), seed_index (A,), reasons (S, 2), accepted (S,), weights (V,) or None), as
        :class:`tractfunc.Tracks` packs them; the weights (soft stopping) are differentiable as the vertices.
    """
    step = params.step if torch.is_tensor(params.step) else None
    if needs_grad(field.sh, seeds, *(() if step is None else (step,))):
        out = _Fused.apply(field.sh, seeds, step, init_dirs, field._replace(sh=None), params, kernel, temperature)
        if decided is not None:
            decided.append(out[8])
        return (out[0], *out[2:7], out[1] if temperature is not None else None)
    values, weights, tape, ids, reasons, acc, ref = forward(field, params, kernel, seeds, init_dirs, temperature)
    if decided is not None:
        decided.append(ref)
    return values, torch.from_numpy(tape.lengths), ids, torch.from_numpy(tape.seed_index), reasons, acc, weights


def jvp(tape: _Tape, t_sh: Optional[Tensor], t_seeds: Tensor, t_step: float):
    """Forward mode along a forward's tape (one C sweep, :func:`adjoint`'s derivative rules).

    Args:
        tape: what :func:`forward` recorded; t_sh: None, or the FOD's tangent (X, Y, Z, N) in the FOD's voxel grid
            (any layout or dtype: converted to the FOD's); t_seeds: (A, 3) scanner mm, the tangents of each accepted
            streamline's seed; t_step: mm, the step's tangent.
    Returns:
        (the vertices' tangents (V, 3) scanner mm, float64; the weights' (V,) float64 under soft stopping, else
        None).
    """
    V = tape.verts.shape[0]
    dverts = np.zeros((V, 3), dtype=np.float64)
    soft = tape.weights is not None
    dweights = np.zeros(V, dtype=np.float64) if soft else None
    verts, sdirs = _double(tape.verts), _double(tape.sdirs)   # (held: the C call reads them)
    ts = np.ascontiguousarray(t_seeds.detach().cpu().numpy(), dtype=np.float64)
    dfod = None
    if t_sh is not None:
        dfod = t_sh.detach().to("cpu", tape.keep[0].dtype).contiguous()
    native.library().sd_jvp(ctypes.byref(tape.config), None if dfod is None else dfod.data_ptr(),
                            tape.lengths.shape[0], _ptr(tape.starts), _ptr(tape.lengths), _ptr(tape.seed_index),
                            _ptr(verts), _ptr(sdirs), _ptr(tape.weights) if soft else None, _ptr(ts), float(t_step),
                            _ptr(dverts), _ptr(dweights) if soft else None, torch.get_num_threads())
    return torch.from_numpy(dverts), None if dweights is None else torch.from_numpy(dweights)


def seed_jacobian_fused(field: FODField, params: TrackParams, kernel: "native.Kernel", seeds: Tensor,
                        init_dirs: Tensor):
    """:func:`track_fused`'s streamlines (detached) and every vertex's Jacobian with respect to its seed.

    Returns (the same tuple as :func:`track_fused`, J (V, 3, 3) in the field's dtype, ``J[v, i, k] = d x_vi /
    d seed_k`` of the vertex's own seed; the identity at seed vertices), by forward propagation of each step's
    3 x 3 Jacobian in C (the implicit-function derivative of every peak, RK4 through its stages)."""
    values, _, tape, ids, reasons, acc, _ = forward(field, params, kernel, seeds, init_dirs)
    J = np.empty((tape.verts.shape[0], 3, 3), dtype=np.float64)
    verts, sdirs = _double(tape.verts), _double(tape.sdirs)   # (held: the C call reads them)
    native.library().sd_seed_jacobian(ctypes.byref(tape.config), tape.lengths.shape[0], _ptr(tape.starts),
                                      _ptr(tape.lengths), _ptr(tape.seed_index), _ptr(verts), _ptr(sdirs), _ptr(J),
                                      torch.get_num_threads())
    out = (values, torch.from_numpy(tape.lengths), ids, torch.from_numpy(tape.seed_index), reasons, acc)
    return out, torch.from_numpy(J).to(field.sh.dtype)
