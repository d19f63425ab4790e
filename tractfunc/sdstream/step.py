"""One SD_Stream iteration on fixed-shape state, and the seed test: what every PyTorch engine steps with.

tckgen semantics reproduced: the seed's peak is found from the initial direction; the forward half starts
along it, the backward half from the seed along its negation; the vertex budget ``max_points`` counts both
halves.  Dead streamlines keep their state (``alive`` mask, ``torch.where``), so a step composes with
``torch.func.vmap / grad / jacrev`` and ``torch.compile``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as tnf

from ..core.field import FODField, MaskField
from ..core.params import TrackParams
from ..core.integrate import find_peak, iterate
from ..core import stop
from ..core.stop import CONTINUE, Reason
from ..core.tracing import is_tracing
from ..errors import TractfuncError

Tensor = torch.Tensor


def check_inputs(field: FODField, seeds: Tensor, init_dirs: Optional[Tensor] = None) -> None:
    """Public-boundary validation: seeds (N, 3) and start directions (N, 3) in the FOD's dtype and on its
    device.  Raises :class:`tractfunc.TractfuncError` naming the mismatch."""
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
