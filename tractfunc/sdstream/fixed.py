"""The fixed-shape tracker: the readable reference that every faster engine is tested against.

:func:`track_fixed` advances both halves of every streamline for exactly ``n_steps`` steps on fixed-shape state
with an ``alive`` mask (``torch.where``, no data-dependent Python control flow), so it composes with
``torch.func.vmap / grad / jacrev / jacfwd`` and ``torch.compile``, and returns padded vertices with a validity
mask (:class:`FixedTracks`). Options for gradients: ``temperature`` (soft stopping: cutoff and angle become
survival weights) and ``checkpoint`` (recompute chunks of steps in backward).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..core import fodgrad
from ..core.arrays import as_tensor
from ..core.field import FODField, MaskField, tracking_field
from ..core.integrate import strongest_peak
from ..core.params import TrackParams
from ..core.stop import CONTINUE, Reason
from ..core.tracing import is_tracing
from ..core.tracks import Tracks
from .step import TrackState, check_inputs, seed_peaks, step

Tensor = torch.Tensor


class FixedTracks(NamedTuple):
    """Padded output of :func:`track_fixed` (tensors only, so it passes through ``torch.func`` transforms).

    vertices: (B, 2T+1, 3) scanner mm in tckgen order (reversed forward half, seed, backward half), packed
    so valid vertices are contiguous; valid: (B, 2T+1) bool; seed_index: (B,) index of the seed vertex
    among the valid ones; accepted: (B,) bool (seed ok and length rule passed, or a half still running after
    T steps); reason_fwd/reason_bwd: (B,) Reason of each half (CONTINUE if it was still alive after T steps);
    weights: (B, 2T+1) survival weight of each vertex (soft termination: product of the step factors from the
    seed out to the vertex; hard: 1 on valid vertices), 0 on padding; with soft ACT / regions
    (:func:`tractfunc.sdstream.act.soft_act`) times the streamline's ``acceptance`` (B,), and ``reach`` (B, R): the
    soft score that each streamline reached each include region (without ACT or regions: ones (B,) and (B, 0))."""
    vertices: Tensor
    valid: Tensor
    seed_index: Tensor
    accepted: Tensor
    reason_fwd: Tensor
    reason_bwd: Tensor
    weights: Tensor
    acceptance: Optional[Tensor] = None
    reach: Optional[Tensor] = None

    def to_tracks(self, soft: bool = False) -> Tracks:
        """The accepted streamlines packed as :class:`tractfunc.Tracks` (engine "fixed"); differentiable.
        soft: keep ``weights`` (else None: hard stopping)."""
        keep = self.valid & self.accepted.unsqueeze(1)
        ids = torch.nonzero(self.accepted).squeeze(1)
        return Tracks(self.vertices[keep], keep.sum(1)[ids], ids, self.seed_index[ids],
                      torch.stack([self.reason_fwd, self.reason_bwd], 1), self.accepted,
                      self.weights[keep] if soft else None, "fixed")


def length_accepted(total: Tensor, cut: Tensor, min_points: int) -> Tensor:
    """tckgen's length rule on fixed shapes: (B,) vertex counts and (B,) bool "a half was still running after
    n_steps" -> (B,) bool, at least max(min_points, 2) vertices, or 2 for a cut streamline (its length unknown)."""
    return (total >= max(min_points, 2)) | (cut & (total >= 2))


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


def track_fixed(field: FODField, params: TrackParams, seeds: Tensor, init_dirs: Optional[Tensor] = None,
                n_steps: Optional[int] = None, mask: Optional[MaskField] = None,
                temperature: Optional[float] = None, checkpoint: int = 0, act=None, regions=None) -> FixedTracks:
    """Track B seeds for ``n_steps`` steps per half on fixed shapes (vmap / grad / jacrev / compile friendly).

    Args:
        field: the FOD; its lookup table is used only when ``params.precomputed`` (``resolve(..., exact=True)``
            gives exact SH and exact peaks, the setting for gradient checks).
        params: :func:`tractfunc.resolve`'s parameters; ``params.step`` may be a 0-d tensor to differentiate
            with respect to it.
        seeds: (B, 3) scanner mm.
        init_dirs: (B, 3) start directions of the seed peak search (normalised here, as :func:`tractfunc.track`
            does), or None for the strongest peak at each seed (:func:`tractfunc.strongest_peak`).
        n_steps: steps per half, None for ``params.max_points`` (never cut short).  A smaller number cuts the
            halves still running after it: their reason is CONTINUE and they count as accepted.  With
            ``n_steps >= params.max_points`` and ``temperature=None`` the valid vertices equal the eager
            engine's streamlines bit for bit.
        mask: optional tracking mask.
        temperature: soft termination (see :func:`tractfunc.sdstream.step.step`); ``weights`` then carry the
            survival factors.  The seed test stays hard (a seed below the cutoff is rejected, as in tckgen,
            and passes no gradient).
        checkpoint: recompute chunks of this many steps during backward instead of storing their intermediates
            (plain autograd only; ignored under torch.func transforms and torch.compile).  The recomputation
            is bit-identical to the forward, so gradients do not change.
        act, regions: soft ACT (a 5TT image, :func:`tractfunc.make_act`) and soft ROIs (:class:`tractfunc.Regions`,
            include and exclude), with ``temperature`` only: tckgen's tissue and region rules as survival and
            acceptance weights (:func:`tractfunc.sdstream.act.soft_act`, proofs/soft_act.md); ACT's seed test is
            applied hard (:func:`tractfunc.sdstream.act.act_seed_ok`).
    Returns:
        :class:`FixedTracks` with T = ``n_steps``; ``.to_tracks()`` packs it.
    """
    seeds = as_tensor(seeds)
    field = tracking_field(field, params)
    if init_dirs is None:
        init_dirs = strongest_peak(field, seeds, polish=params.peak_polish)
    init_dirs = as_tensor(init_dirs)
    if not is_tracing(seeds, init_dirs, field.sh):
        check_inputs(field, seeds, init_dirs)
    init_dirs = init_dirs / torch.linalg.vector_norm(init_dirs, dim=-1, keepdim=True)
    n_steps = params.max_points if n_steps is None else int(n_steps)
    if (act is not None or regions is not None) and temperature is None:
        from ..errors import TractfuncError
        raise TractfuncError("the fixed engine applies ACT and ROIs softly only (temperature=, stopping=Soft(T)); "
                             "hard ACT / ROIs run on the native and follow engines")
    token, sink = fodgrad.attach(field.sh)
    if sink is not None:   # plain autograd wrt the FOD: one gradient buffer, compact saved state
        field = field._replace(grad_token=token, grad_sink=sink)
    sd = seed_peaks(field, params, mask, seeds, init_dirs, polish=params.peak_polish)
    one = torch.ones(seeds.shape[:1], dtype=torch.long, device=seeds.device)
    fv, fa, fw, fs = _half_fixed(field, params, mask, seeds, sd.dir, sd.ok, one, n_steps, temperature, checkpoint)
    # soft ACT / ROIs: a half runs past its (post hoc) anatomical stop, so the shared vertex budget would starve the
    # other half; each half then has its own (proofs/soft_act.md)
    n_bwd = one if (act is not None or regions is not None) else fs.n
    bv, ba, bw, bs = _half_fixed(field, params, mask, seeds, -sd.dir, sd.ok, n_bwd, n_steps, temperature,
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
    cut = (fs.reason == CONTINUE) | (bs.reason == CONTINUE)   # still running after T steps: length unknown
    accepted = sd.ok & length_accepted(total, cut, params.min_points)
    acceptance, reach = seeds.new_ones(seeds.shape[:1]), seeds.new_zeros(seeds.shape[0], 0)   # no rules: 1, none
    if act is not None or regions is not None:
        from .act import act_seed_ok, soft_act
        if act is not None:
            accepted = accepted & act_seed_ok(act, seeds)
        bad = torch.stack([_bad_end(fs.reason), _bad_end(bs.reason)], 1)
        sa = soft_act(act, regions, verts, valid, n_fwd, torch.where(valid, lw, torch.zeros_like(lw)), bad,
                      temperature, params.min_points, params.max_points)
        weights, acceptance, reach = sa.weights, sa.acceptance, sa.reach
    seed_reason = torch.full_like(fs.reason, int(Reason.SEED_REJECTED))
    return FixedTracks(verts, valid, n_fwd, accepted,
                       torch.where(sd.ok, fs.reason, seed_reason), torch.where(sd.ok, bs.reason, seed_reason),
                       weights, acceptance, reach)


def _bad_end(reason: Tensor) -> Tensor:
    """(B,) a soft half's hard stop that ACT rejects: the vertex budget, or a failed peak search (soft stopping
    reports it as CUTOFF / CURVATURE)."""
    return (reason == int(Reason.MAX_LENGTH)) | (reason == int(Reason.CUTOFF)) | (reason == int(Reason.CURVATURE))
