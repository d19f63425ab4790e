"""Bidirectional streamline tracking composed from the primitives, with tckgen's bookkeeping.

Two drivers share :func:`tractfunc.step.iterate` and the :class:`TrackState` record:

* :func:`track` -- eager: seeds in chunks, dead streamlines dropped from the batch between steps
  (active set), Newton iterations exit early; returns a :class:`Tractogram` of variable-length streamlines.
* :func:`track_fixed` -- functional: a fixed number of steps per half on fixed-shape state with an
  ``alive`` mask (``torch.where``, no data-dependent Python control flow), so it composes with
  ``torch.func.vmap / grad / jacrev`` and ``torch.compile``; returns padded vertices and a validity mask.
  Options for gradients: ``temperature`` (soft termination: cutoff and angle become survival weights)
  and ``checkpoint`` (recompute chunks of steps in backward: memory O(B x T x state)).

tckgen semantics reproduced: the seed's peak is found from the initial direction; the forward half starts
along it, the backward half from the seed along its negation; output order is the reversed forward half,
the seed, the backward half; the vertex budget ``max_points`` counts both halves; streamlines with fewer
than ``min_points`` vertices (or only the seed) are rejected.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, NamedTuple, Optional

import torch
import torch.nn.functional as tnf
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..core import fodgrad, stop
from . import pipelined as _pipelined
from ..core.arrays import as_tensor
from ..core.field import FODField, MaskField
from ..core.params import TrackParams
from ..core.integrate import find_peak, iterate
from ..core.stop import CONTINUE, Reason
from ..core.tracing import is_tracing, needs_grad

Tensor = torch.Tensor


def check_inputs(field: FODField, seeds: Tensor, init_dirs: Optional[Tensor] = None) -> None:
    """Public-boundary validation: seeds (N, 3) and start directions (N, 3) in the FOD's dtype and on its
    device.  Raises :class:`tractfunc.io.TractfuncError` naming the mismatch."""
    from ..errors import TractfuncError
    sh = field.sh
    for name, t in (("seeds", seeds), ("init_dirs", init_dirs)):
        if t is None:
            continue
        if t.dim() != 2 or t.shape[-1] != 3:
            raise TractfuncError(f"{name} has shape {tuple(t.shape)}; expected (N, 3)")
        if t.dtype != sh.dtype or t.device != sh.device:
            raise TractfuncError(f"{name} are {t.dtype} on {t.device} but the FOD is {sh.dtype} on {sh.device}; "
                                 "expected the same dtype and device (use .to(field.sh))")
    if init_dirs is not None and init_dirs.shape != seeds.shape:
        raise TractfuncError(f"init_dirs has shape {tuple(init_dirs.shape)}; expected one direction per seed "
                             f"{tuple(seeds.shape)}")


class TrackState(NamedTuple):
    """Fixed-shape state of B streamline halves.  pos: (B, 3) scanner mm; dir: (B, 3) unit;
    alive: (B,) bool; n: (B,) int64 vertices so far over both halves; reason: (B,) int64 Reason;
    logw: (B,) log survival weight and hard: (B,) bool, hard tracking would still be running (soft
    termination only, else None)."""
    pos: Tensor
    dir: Tensor
    alive: Tensor
    n: Tensor
    reason: Tensor
    logw: Optional[Tensor] = None
    hard: Optional[Tensor] = None


def survival_increment(amp_margin: Tensor, cos_margin: Tensor, temperature: float) -> Tensor:
    """Log survival factor of one step: ``log s(amp_margin / T) + log s(cos_margin / T)`` with s the
    logistic function.  Margins: FOD amplitude above the cutoff, cosine of the turn above the angle
    limit; (B,) each.  As T -> 0 the factor tends to 1 where hard tracking continues and 0 where it stops."""
    return tnf.logsigmoid(amp_margin / temperature) + tnf.logsigmoid(cos_margin / temperature)


def _iterate_alive(field, params, mask, state: TrackState, early_exit: bool, soft: bool):
    """``iterate`` on the alive rows only (eager shortcut: dead rows would still pay for peak searches
    that may run all 50 Newton iterations); dead rows get their old position and direction."""
    if not early_exit or is_tracing(state.pos, state.dir, field.sh) or bool(state.alive.all()):
        return iterate(field, params, mask, state.pos, state.dir, early_exit, soft)
    idx = torch.nonzero(state.alive).squeeze(1)
    sub = iterate(field, params, mask, state.pos[idx], state.dir[idx], early_exit, soft)
    base = (state.pos, state.dir, torch.full_like(state.n, int(Reason.CUTOFF)),
            *(x.new_zeros(state.pos.shape[:1]) for x in sub[3:]))
    return type(sub)(*(b.index_copy(0, idx, x) for b, x in zip(base, sub)))


def step(state: TrackState, field: FODField, params: TrackParams, mask: Optional[MaskField] = None,
         early_exit: bool = False, temperature: Optional[float] = None):
    """Advance every alive streamline by one tckgen iteration; dead ones keep their state.

    temperature: None for hard stops (tckgen); a positive number for soft termination: cutoff and angle
    no longer stop, ``state.logw`` accumulates :func:`survival_increment`, and ``state.hard`` records
    whether hard tracking would still be running.  Only those vertices count towards the vertex budget,
    so as temperature -> 0 both halves recover the hard streamline, with weight -> 0 beyond its end.
    Returns (new_state, added) where added: (B,) bool marks streamlines that appended ``new_state.pos``
    as a vertex."""
    soft = temperature is not None
    m = _iterate_alive(field, params, mask, state, early_exit, soft)
    moved = state.alive & (m.reason == CONTINUE)
    counted, hard, logw = moved, state.hard, state.logw
    if soft:
        counted = state.hard & moved & (m.amp_margin >= 0) & (m.cos_margin >= 0)
        hard = counted
        logw = torch.where(moved, state.logw + survival_increment(m.amp_margin, m.cos_margin, temperature),
                           state.logw)
    n = state.n + counted.long()
    full = counted & stop.length_reached(n, params.max_points)
    reason = torch.where(state.alive & ~moved, m.reason, state.reason)
    reason = torch.where(full, torch.full_like(reason, int(Reason.MAX_LENGTH)), reason)
    alive = moved & ~full
    mv = moved.unsqueeze(-1)
    new = TrackState(torch.where(mv, m.pos, state.pos), torch.where(mv, m.dir, state.dir), alive, n, reason,
                     logw, hard)
    return new, moved


class Seeded(NamedTuple):
    """Seed-time result: dir (B, 3) peak direction at the seed; ok (B,) whether tracking may start."""
    dir: Tensor
    ok: Tensor


def seed_peaks(field: FODField, params: TrackParams, mask: Optional[MaskField], seeds: Tensor,
               init_dirs: Tensor, early_exit: bool = True, polish: int = 0) -> Seeded:
    """tckgen ``check_seed`` + ``init``: the seed must lie in the mask and the image, and have a
    supra-threshold peak reachable from ``init_dirs``.  seeds: (B, 3) mm; init_dirs: (B, 3) unit."""
    d, amp, inside = find_peak(field, seeds, init_dirs, early_exit, polish, params.state_dtype)
    ok = inside & ~stop.below_cutoff(amp, params.cutoff)
    if mask is not None:
        ok = ok & ~stop.outside_mask(mask.mask, mask.world_to_voxel, seeds)
    return Seeded(torch.where(ok.unsqueeze(-1), d, init_dirs), ok)


# --------------------------------------------------------------------------------------------------
# functional driver


class FixedTracks(NamedTuple):
    """Padded output of :func:`track_fixed`.

    vertices: (B, 2T+1, 3) scanner mm in tckgen order (reversed forward half, seed, backward half), packed
    so valid vertices are contiguous; valid: (B, 2T+1) bool; seed_index: (B,) index of the seed vertex
    among the valid ones; accepted: (B,) bool (seed ok and length rule passed); reason_fwd/reason_bwd:
    (B,) Reason of each half (CONTINUE if it was still alive after T steps); weights: (B, 2T+1) survival
    weight of each vertex (soft termination: product of the step factors from the seed out to the vertex;
    hard: 1 on valid vertices), 0 on padding."""
    vertices: Tensor
    valid: Tensor
    seed_index: Tensor
    accepted: Tensor
    reason_fwd: Tensor
    reason_bwd: Tensor
    weights: Tensor


def _run_steps(field, params, mask, temperature, n, *state):
    """n steps from a flat state tuple -> (vertices (B, n, 3), added (B, n), logw (B, n) or None, *state)."""
    st = TrackState(*state)
    verts, adds, logws = [], [], []
    for _ in range(n):
        st, added = step(st, field, params, mask, early_exit=True, temperature=temperature)
        verts.append(st.pos)
        adds.append(added)
        logws.append(st.logw)
    lw = torch.stack(logws, 1) if temperature is not None else None
    return (torch.stack(verts, 1), torch.stack(adds, 1), lw, *st)


def _half_fixed(field, params, mask, pos, dir, ok, n0, n_steps, temperature, chunk):
    soft = temperature is not None
    state = (pos, dir, ok, n0, torch.zeros_like(n0), pos.new_zeros(pos.shape[:1]) if soft else None,
             ok if soft else None)
    if n_steps == 0:
        return pos.new_zeros(pos.shape[0], 0, 3), ok.new_zeros(ok.shape[0], 0), None, TrackState(*state)
    use_ckpt = chunk > 0 and torch.is_grad_enabled() and not is_tracing(pos, field.sh)
    parts = []
    for start in range(0, n_steps, chunk if use_ckpt else n_steps):
        n = min(n_steps - start, chunk) if use_ckpt else n_steps
        if use_ckpt:
            out = _checkpoint(_run_steps, field, params, mask, temperature, n, *state, use_reentrant=False)
        else:
            out = _run_steps(field, params, mask, temperature, n, *state)
        parts.append(out[:3])
        state = out[3:]
    verts = torch.cat([p[0] for p in parts], 1)
    adds = torch.cat([p[1] for p in parts], 1)
    lw = torch.cat([p[2] for p in parts], 1) if temperature is not None else None
    return verts, adds, lw, TrackState(*state)


def track_fixed(field: FODField, params: TrackParams, seeds: Tensor, init_dirs: Tensor, n_steps: int,
                mask: Optional[MaskField] = None, temperature: Optional[float] = None,
                checkpoint: int = 0) -> FixedTracks:
    """Track B seeds for at most ``n_steps`` per half, on fixed shapes (vmap/grad/compile friendly).

    seeds: (B, 3) scanner mm; init_dirs: (B, 3) unit start directions for the seed peak search.
    With ``n_steps >= params.max_points`` and ``temperature=None`` the valid vertices equal
    :func:`track`'s streamlines bit for bit.
    temperature: soft termination (see :func:`step`); ``weights`` then carry the survival factors.  The
    seed test stays hard (a seed below the cutoff is rejected, as in tckgen, and passes no gradient).
    checkpoint: recompute chunks of this many steps during backward instead of storing their
    intermediates (plain autograd only; ignored under torch.func transforms and torch.compile).  The
    recomputation is bit-identical to the forward, so gradients do not change."""
    seeds, init_dirs = as_tensor(seeds), as_tensor(init_dirs)
    if not is_tracing(seeds, init_dirs, field.sh):
        check_inputs(field, seeds, init_dirs)
    token, sink = fodgrad.attach(field.sh)
    if sink is not None:   # plain autograd wrt the FOD: one gradient buffer, compact saved state
        field = field._replace(grad_token=token, grad_sink=sink)
    sd = seed_peaks(field, params, mask, seeds, init_dirs, polish=params.peak_polish)
    one = torch.ones(seeds.shape[:1], dtype=torch.long, device=seeds.device)
    fv, fa, fw, fs = _half_fixed(field, params, mask, seeds, sd.dir, sd.ok, one, n_steps, temperature, checkpoint)
    bv, ba, bw, bs = _half_fixed(field, params, mask, seeds, -sd.dir, sd.ok, fs.n, n_steps, temperature,
                                 checkpoint)
    # forward vertices are a prefix of fv (a half never restarts); reverse it so they become a suffix
    verts = torch.cat([fv.flip(1), seeds.unsqueeze(1), bv], 1)
    n_fwd = fa.sum(1)
    # pack: move the valid forward suffix to the front with a roll-free gather
    T = fv.shape[1]
    idx = torch.arange(2 * T + 1, device=seeds.device).unsqueeze(0) + (T - n_fwd).unsqueeze(1)
    idx = idx.clamp(max=2 * T).unsqueeze(-1)
    verts = torch.gather(verts, 1, idx.expand(-1, -1, 3))
    total = n_fwd + 1 + ba.sum(1)
    valid = (torch.arange(2 * T + 1, device=seeds.device).unsqueeze(0) < total.unsqueeze(1)) & sd.ok.unsqueeze(1)
    if temperature is None:
        weights = valid.to(seeds.dtype)
    else:
        lw = torch.cat([fw.flip(1), torch.zeros_like(seeds[:, :1]), bw], 1)
        lw = torch.gather(lw, 1, idx.squeeze(-1))
        weights = torch.where(valid, torch.exp(lw), torch.zeros_like(lw))
    accepted = sd.ok & (total >= max(params.min_points, 2))
    seed_reason = torch.full_like(fs.reason, int(Reason.SEED_REJECTED))
    return FixedTracks(verts, valid, n_fwd, accepted,
                       torch.where(sd.ok, fs.reason, seed_reason), torch.where(sd.ok, bs.reason, seed_reason),
                       weights)


# --------------------------------------------------------------------------------------------------
# eager driver


class Tractogram(NamedTuple):
    """Result of :func:`track`.

    streamlines: list of (n_i, 3) float tensors, scanner mm, accepted streamlines in seed order;
    seed_ids: (S,) int64 index of each accepted streamline's seed in the input; seed_index: (S,) index of
    the seed vertex inside each streamline; reasons: (n_seeds, 2) Reason per half for every seed
    (SEED_REJECTED where the seed failed); accepted: (n_seeds,) bool."""
    streamlines: List[Tensor]
    seed_ids: Tensor
    seed_index: Tensor
    reasons: Tensor
    accepted: Tensor


def _half_eager(field, params, mask, pos, dir, n0):
    """Propagate one half for a batch (all alive); return (vertex rows, final n, final reason).  Vertex
    rows = (streamline index (R,), position (R, 3)) in step order."""
    B = pos.shape[0]
    rows_idx, rows_pos = [], []
    idx = torch.arange(B, device=pos.device)
    state = TrackState(pos, dir, torch.ones(B, dtype=torch.bool, device=pos.device), n0,
                       torch.zeros(B, dtype=torch.long, device=pos.device))
    final_n = n0.clone()
    final_reason = torch.zeros(B, dtype=torch.long, device=pos.device)
    while idx.numel():
        state, added = step(state, field, params, mask, early_exit=True)
        rows_idx.append(idx[added])
        rows_pos.append(state.pos[added])
        dead = ~state.alive
        if bool(dead.any()):
            final_n[idx[dead]] = state.n[dead]
            final_reason[idx[dead]] = state.reason[dead]
            keep = state.alive
            idx = idx[keep]
            state = TrackState(*(None if t is None else t[keep] for t in state))
    return _cat_rows((rows_idx, rows_pos), pos), final_n, final_reason


def _cat_rows(rows, like):
    """Lists of (index, position) blocks -> one (R,) index and (R, 3) position tensor."""
    if not rows[0]:
        return torch.zeros(0, dtype=torch.long, device=like.device), like.new_zeros(0, 3)
    return torch.cat(rows[0]), torch.cat(rows[1])


def _ranked(idx: Tensor, n: int):
    """Rows in step order -> (order, streamline of each sorted row, rank of the row within its
    streamline, counts (n,)).  A stable sort by streamline keeps the step order inside each streamline."""
    order = torch.sort(idx, stable=True).indices
    si = idx[order]
    counts = torch.bincount(idx, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(idx.numel(), device=idx.device) - starts[si]
    return order, si, rank, counts


def _pack(seeds: Tensor, fwd, bwd, min_points: int):
    """Assemble accepted streamlines of one batch without a loop over streamlines.

    seeds: (S, 3); fwd, bwd: vertex rows (index (R,), position (R, 3)) of each half, in step order.
    Returns (vertices (V, 3) in tckgen order, streamline after streamline; lengths (A,); forward vertex
    counts (A,) = seed vertex index; accepted (S,) bool)."""
    S = seeds.shape[0]
    fo, fi, fr, fcnt = _ranked(fwd[0], S)
    bo, bi, br, bcnt = _ranked(bwd[0], S)
    total = fcnt + 1 + bcnt
    acc = total >= max(min_points, 2)
    lengths = torch.where(acc, total, torch.zeros_like(total))
    off = torch.cumsum(lengths, 0) - lengths
    out = seeds.new_empty(int(lengths.sum()), 3)
    out[(off + fcnt)[acc]] = seeds[acc]
    keep = acc[fi]   # forward half reversed: its last vertex comes first
    out[(off[fi] + fcnt[fi] - 1 - fr)[keep]] = fwd[1][fo][keep]
    keep = acc[bi]
    out[(off[bi] + fcnt[bi] + 1 + br)[keep]] = bwd[1][bo][keep]
    return out, lengths[acc], fcnt[acc], acc


def _track_chunk(field, params, mask, seeds, init_dirs, pipelined=True, compiled=False, kernel=None):
    if kernel is not None:   # native tckgen-exact kernel (float32, CPU, no gradient)
        out = kernel.track(seeds.numpy(), init_dirs.numpy())
        return tuple(torch.from_numpy(x) for x in out)
    B = seeds.shape[0]
    sd = seed_peaks(field, params, mask, seeds, init_dirs, early_exit=True, polish=params.peak_polish)
    ok_idx = torch.nonzero(sd.ok).squeeze(1)
    reasons = torch.full((B, 2), int(Reason.SEED_REJECTED), dtype=torch.long, device=seeds.device)
    s, d = seeds[ok_idx], sd.dir[ok_idx]
    if pipelined and _pipelined.supported(params) and not (s.requires_grad or field.sh.requires_grad):
        move = _pipelined.compiled_move() if compiled else _pipelined.newton_move
        frows, brows, rs = _pipelined.track_halves(field, params, mask, s, d, move)
        fwd, bwd = _cat_rows(frows, s), _cat_rows(brows, s)
        fr, br = rs[:, 0], rs[:, 1]
    else:
        one = torch.ones(s.shape[0], dtype=torch.long, device=seeds.device)
        fwd, fn, fr = _half_eager(field, params, mask, s, d, one)
        bwd, _, br = _half_eager(field, params, mask, s, -d, fn)
    reasons[ok_idx, 0] = fr
    reasons[ok_idx, 1] = br
    verts, lengths, sidx, acc = _pack(s, fwd, bwd, params.min_points)
    accepted = torch.zeros(B, dtype=torch.bool, device=seeds.device)
    accepted[ok_idx] = acc
    return verts, lengths, ok_idx[acc], sidx, reasons, accepted


def random_directions(n: int, generator: Optional[torch.Generator] = None, dtype=torch.float32,
                      device=None) -> Tensor:
    """(n, 3) unit vectors uniform on the sphere, drawn from ``generator`` (on the CPU, then moved)."""
    v = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v.to(dtype=dtype, device=device)


class PackedTracks(NamedTuple):
    """Result of :func:`track_packed`: accepted streamlines concatenated (one tensor, no Python objects
    per streamline; what a GPU run or a file writer wants).

    vertices: (V, 3) scanner mm, streamline after streamline, each in tckgen order; lengths: (A,) int64
    vertex count of each; seed_ids, seed_index, reasons, accepted: as in :class:`Tractogram`."""
    vertices: Tensor
    lengths: Tensor
    seed_ids: Tensor
    seed_index: Tensor
    reasons: Tensor
    accepted: Tensor

    def split(self) -> List[Tensor]:
        """The streamlines as a list of (n_i, 3) views."""
        return list(torch.split(self.vertices, self.lengths.tolist()))


def seeds_ok(result):
    """(S,) NumPy bool per seed of a :class:`Tractogram` / :class:`PackedTracks`: False where the seed was
    rejected (outside the mask or image, or no peak above the cutoff)."""
    return (result.reasons[:, 0] != int(Reason.SEED_REJECTED)).cpu().numpy()


BACKENDS = ("auto", "native", "torch")


def uses_native(field: FODField, params: TrackParams, seeds: Tensor, backend: str = "auto",
                compiled: bool = False) -> bool:
    """Whether :func:`track` / :func:`track_packed` with these arguments run the native kernel
    (:mod:`tractfunc.sdstream.native`) rather than the PyTorch tracker.  Raises :class:`tractfunc.io.TractfuncError`
    for an unknown backend, or for ``backend="native"`` where the kernel cannot run the job."""
    from . import native
    from ..errors import TractfuncError
    if backend not in BACKENDS:
        raise TractfuncError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and compiled):
        return False
    # a derivative through the tracker (autograd or a torch.func transform) needs the PyTorch tracker
    grad = needs_grad(seeds, field.sh) or is_tracing(seeds, field.sh)
    if native.supported(field, params, grad):
        return True
    if backend == "native":
        ok, why = native.available()
        raise TractfuncError("the native backend needs float32 tensors on the CPU, no gradient, tckgen's lookup-table "
                             f"peaks and a numeric step{'' if ok else f' (and it is unavailable: {why})'}")
    return False


DECISIONS = ("auto", "own", "native")


def follows_native(field: FODField, params: TrackParams, seeds: Tensor, backend: str = "auto",
                   compiled: bool = False, decisions: str = "auto") -> bool:
    """Whether :func:`track` / :func:`track_packed` run the PyTorch tracker with its discrete decisions
    (peak basins, where each half stops) taken from the native kernel, i.e. from tckgen's float32
    arithmetic, and its values computed in the field's dtype (:mod:`tractfunc.sdstream.follow`).

    decisions: "own" -- the PyTorch tracker decides in its own arithmetic (at rounding-level ties, ~0.1 %
    of streamlines, it then differs from tckgen; near the z pole, where tckgen's peak search is
    ill-conditioned, it stays exact); "native" -- always from the kernel (tckgen's streamlines, tckgen's
    pole behaviour included); "auto" -- from the kernel where ``backend="auto"`` resolves to the PyTorch
    tracker (float64, or a gradient) on the CPU and the kernel is available (the command line's default).
    Raises :class:`tractfunc.io.TractfuncError` for an unknown value, or for "native" where the kernel
    cannot decide (exact-SH peaks, unavailable kernel)."""
    from . import native
    from ..errors import TractfuncError
    if decisions not in DECISIONS:
        raise TractfuncError(f"decisions must be one of {DECISIONS}, got {decisions!r}")
    if decisions == "own" or uses_native(field, params, seeds, backend, compiled):
        return False
    ok = native.available()[0] and params.precomputed and field.table is not None and field.sh.shape[-1] <= 91
    if decisions == "native" and not ok:
        raise TractfuncError("decisions='native' needs the native kernel (available: "
                             f"{native.available()[1] or 'yes'}) and tckgen's lookup-table peaks (precomputed=True)")
    return ok and (decisions == "native" or (backend == "auto" and not compiled and field.sh.device.type == "cpu"))


def _decision_kernel(field: FODField, params: TrackParams, mask: Optional[MaskField]):
    """The native kernel on a float32 CPU copy of the field, with tckgen's settings of ``params``."""
    from . import native
    step = float(params.step.detach()) if torch.is_tensor(params.step) else params.step
    return native.Kernel.from_field(field._replace(sh=field.sh.detach().to("cpu", torch.float32),
                                                   nonzero=field.nonzero.cpu(), grad_token=None, grad_sink=None),
                                    params._replace(step=step, peak_polish=0, state_dtype=torch.float32), mask)


def _follow_chunk(field, params, kernel, seeds, init_dirs):
    """Decisions from ``kernel`` (tckgen's arithmetic), values in ``field``'s dtype and device."""
    from .follow import follow
    s32, d32 = seeds.detach().float().cpu().numpy(), init_dirs.detach().float().cpu().numpy()
    v, ln, ids, si, r, a = (torch.from_numpy(x) for x in kernel.track(s32, d32))
    dev = seeds.device
    seed_peak = None
    if params.rk4:   # RK4's first stages search from the seed peak (Euler searches from each step's own direction)
        rows = ids.numpy()
        seed_peak = torch.from_numpy(kernel.seed_steps(s32[rows], d32[rows])[0]).to(dev)
    ids, ln, si = ids.to(dev), ln.to(dev), si.to(dev)
    fol = follow(field, params, seeds[ids], v.to(dev), ln, si, seed_peak)
    if not bool(fol.faithful.all()):
        import warnings
        warnings.warn(f"{int((~fol.faithful).sum())} streamline(s) could not take every step of the native "
                      f"kernel's decisions in {seeds.dtype} (a peak search failed or a step left the image)")
    return fol.vertices, ln, ids, si, r.to(dev), a.to(dev)


def track_packed(field: FODField, params: TrackParams, seeds: Tensor, init_dirs: Optional[Tensor] = None,
                 mask: Optional[MaskField] = None, generator: Optional[torch.Generator] = None,
                 chunk_size: int = 20000, progress: Optional[Callable[[int, int, int], None]] = None,
                 pipelined: bool = True, compiled: bool = False, backend: str = "auto",
                 decisions: str = "own") -> PackedTracks:
    """:func:`track` with the streamlines returned packed (:class:`PackedTracks`); same arguments, and
    compiled: fuse the pipelined driver's Newton move with ``torch.compile``
    (:func:`tractfunc.sdstream.pipelined.compiled_move`: faster, esp. on a GPU; float32 results are no longer bit
    for bit tckgen's arithmetic, see docs/benchmarks.md)."""
    seeds, init_dirs = as_tensor(seeds), None if init_dirs is None else as_tensor(init_dirs)
    check_inputs(field, seeds, init_dirs)
    S = seeds.shape[0]
    if init_dirs is None:
        init_dirs = random_directions(S, generator, seeds.dtype, seeds.device)
    kernel = decider = None
    if uses_native(field, params, seeds, backend, compiled):
        from . import native
        kernel = native.Kernel.from_field(field, params, mask)
    elif follows_native(field, params, seeds, backend, compiled, decisions):
        decider = _decision_kernel(field, params, mask)
    if kernel is None and decider is None:   # (the kernel normalises in single precision, as tckgen does)
        init_dirs = init_dirs / torch.linalg.vector_norm(init_dirs, dim=-1, keepdim=True)
    parts = []
    n_acc = 0
    with torch.no_grad() if not (seeds.requires_grad or field.sh.requires_grad) else contextlib.nullcontext():
        for start in range(0, S, chunk_size):
            sl = slice(start, min(S, start + chunk_size))
            if decider is not None:
                v, ln, ids, si, r, a = _follow_chunk(field, params, decider, seeds[sl], init_dirs[sl])
            else:
                v, ln, ids, si, r, a = _track_chunk(field, params, mask, seeds[sl], init_dirs[sl], pipelined,
                                                    compiled, kernel)
            parts.append((v, ln, ids + start, si, r, a))
            n_acc += ln.numel()
            if progress is not None:
                progress(sl.stop, S, n_acc)
    if not parts:
        z = torch.zeros(0, dtype=torch.long, device=seeds.device)
        return PackedTracks(seeds.new_zeros(0, 3), z, z, z, z.new_zeros(0, 2), z.new_zeros(0, dtype=torch.bool))
    return PackedTracks(*(torch.cat(x) for x in zip(*parts)))


def track(field: FODField, params: TrackParams, seeds: Tensor, init_dirs: Optional[Tensor] = None,
          mask: Optional[MaskField] = None, generator: Optional[torch.Generator] = None,
          chunk_size: int = 20000, progress: Optional[Callable[[int, int, int], None]] = None,
          pipelined: bool = True, compiled: bool = False, backend: str = "auto",
          decisions: str = "own") -> Tractogram:
    """Track from every seed (eager, fast path).

    seeds: (S, 3) scanner mm, dtype/device of the computation; init_dirs: (S, 3) start directions for the
    seed peak search (normalised here), or None for uniformly random ones from ``generator`` (tckgen's
    behaviour).  progress(done_seeds, total_seeds, accepted) is called after each chunk.
    pipelined: schedule Newton searches per streamline (:mod:`tractfunc.sdstream.pipelined`; same output, faster);
    used for Euler without peak polishing when no gradient is requested.
    backend: "native" runs :mod:`tractfunc.sdstream.native`, a C kernel with tckgen's exact single-precision
    arithmetic (bit-identical streamlines, several times faster; float32 on the CPU without gradients);
    "torch" runs the PyTorch tracker (any dtype/device, differentiable); "auto" (default) takes the
    kernel where it applies and builds, else PyTorch.
    decisions: where the PyTorch tracker runs, who takes its discrete decisions (peak basins, where each
    half stops): "own" (default: its own arithmetic; pole-safe, and equal to :func:`track_fixed`),
    "native" (the kernel's, i.e. tckgen's -- tckgen's streamlines with every value recomputed in the
    field's dtype, differentiable: :mod:`tractfunc.sdstream.follow`; what the command line does for float64), or
    "auto" (the kernel's where ``backend="auto"`` falls back to PyTorch on the CPU); see
    :func:`follows_native`.
    For many streamlines (or on a GPU) :func:`track_packed` avoids one tensor per streamline."""
    p = track_packed(field, params, seeds, init_dirs, mask, generator, chunk_size, progress, pipelined, compiled,
                     backend, decisions)
    return Tractogram(p.split(), p.seed_ids, p.seed_index, p.reasons, p.accepted)
