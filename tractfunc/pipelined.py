"""Pipelined eager tracking: every streamline runs its own Newton search, none waits for the slowest.

The plain eager driver (:func:`tractfunc.tracking.track` with ``pipelined=False``) takes one step for all
alive streamlines, and a step ends only when the last peak search of the batch has converged (up to 50
Newton iterations), so every step costs the slowest search.  Here each tick applies one Newton move to
every streamline still searching; the streamlines whose search finished then take their step (stop
tests, move, mask test, sample the FOD at the new point) and start the next search on the following tick.
A streamline switches from its forward half to its backward half as soon as the forward half ends.

The arithmetic per streamline is exactly that of the plain driver (same functions, same order), so the
output is identical; only the schedule differs.  Euler steps without peak polishing (tckgen's default);
other settings use the plain driver.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import stop
from .direction import ANGLE_TOLERANCE, MAX_ITER, newton_move
from .field import FODField, MaskField
from .integrate import mask_test, sd_move
from .params import TrackParams
from .stop import CONTINUE, Reason

Tensor = torch.Tensor

SEARCH_FWD, SEARCH_BWD, DONE = 1, 2, 3


def supported(params: TrackParams) -> bool:
    return not params.rk4 and params.peak_polish == 0


def track_halves(field: FODField, params: TrackParams, mask: Optional[MaskField], seeds: Tensor, dirs: Tensor):
    """Both halves of S accepted seeds.  seeds: (S, 3) mm; dirs: (S, 3) seed peak directions.

    Returns (fwd_rows, bwd_rows, reasons (S, 2)) where each rows = (streamline index (R,), position (R, 3),
    tick (R,)) lists the vertices each half appended, in order per streamline."""
    S = seeds.shape[0]
    dev = seeds.device
    sample = field.sample(seeds)
    c_seed = sample.values
    pos, dir = seeds.clone(), dirs.clone()
    coeffs, u = c_seed.clone(), dirs.clone()
    iters = torch.zeros(S, dtype=torch.long, device=dev)
    n = torch.ones(S, dtype=torch.long, device=dev)
    phase = torch.full((S,), SEARCH_FWD, dtype=torch.long, device=dev)
    reasons = torch.zeros(S, 2, dtype=torch.long, device=dev)
    rows = {SEARCH_FWD: ([], [], []), SEARCH_BWD: ([], [], [])}
    act = torch.arange(S, device=dev)
    tick = 0
    nan = float("nan")
    while act.numel():
        v, a, dt = newton_move(coeffs[act], u[act], field.table)
        it = iters[act] + 1
        conv = dt < ANGLE_TOLERANCE
        fin = conv | (it >= MAX_ITER)
        iters[act] = it
        keep = ~fin
        u[act[keep]] = v[keep]
        f = act[fin]
        if f.numel():
            cf = conv[fin].unsqueeze(-1)
            new_dir = torch.where(cf, v[fin], torch.full_like(v[fin], nan))
            amp = torch.where(conv[fin], a[fin], torch.full_like(a[fin], nan))
            # the searches started inside the image (a half ends as soon as it samples outside)
            m = mask_test(mask, sd_move(params, pos[f], dir[f], new_dir, amp, torch.ones_like(conv[fin])))
            reason, new_pos, safe_dir = m.reason, m.pos, m.dir
            go = reason == CONTINUE
            nn = n[f] + go.long()
            full = go & stop.length_reached(nn, params.max_points)
            reason = torch.where(full, int(Reason.MAX_LENGTH), reason)
            n[f] = nn
            ph = phase[f]
            for half in (SEARCH_FWD, SEARCH_BWD):   # record appended vertices per half
                sel = go & (ph == half)
                if bool(sel.any()):
                    r = rows[half]
                    r[0].append(f[sel])
                    r[1].append(new_pos[sel])
                    r[2].append(torch.full((int(sel.sum()),), tick, dtype=torch.long, device=dev))
            cont = go & ~full
            # continuing streamlines: sample at the new point; leaving the image ends the half there
            fc = f[cont]
            if fc.numel():
                s = field.sample(new_pos[cont])
                pos[fc], dir[fc] = new_pos[cont], safe_dir[cont]
                coeffs[fc], u[fc], iters[fc] = s.values, safe_dir[cont], 0
                left = ~s.inside
                ended = torch.zeros_like(cont)
                ended[torch.nonzero(cont).squeeze(1)[left]] = True
                reason = torch.where(ended, int(Reason.EXIT_IMAGE), reason)
                cont = cont & ~ended
            stopped = ~cont
            fs, ph_s = f[stopped], ph[stopped]
            if fs.numel():
                col = (ph_s - SEARCH_FWD)
                reasons[fs, col] = reason[stopped]
                to_bwd = fs[ph_s == SEARCH_FWD]
                phase[fs] = torch.where(ph_s == SEARCH_FWD, SEARCH_BWD, DONE)
                if to_bwd.numel():
                    pos[to_bwd], dir[to_bwd] = seeds[to_bwd], -dirs[to_bwd]
                    coeffs[to_bwd], u[to_bwd], iters[to_bwd] = c_seed[to_bwd], -dirs[to_bwd], 0
        act = torch.nonzero(phase < DONE).squeeze(1)
        tick += 1
    return rows[SEARCH_FWD], rows[SEARCH_BWD], reasons
