"""Pipelined eager tracking: every streamline runs its own Newton search, none waits for the slowest.

The plain eager driver (:func:`tractfunc.sdstream.eager.track_chunk` with ``pipelined=False``) takes one step for all
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

from typing import Callable, Optional

import torch

from ..core import stop
from ..core.newton import ANGLE_TOLERANCE, MAX_ITER, newton_move, store
from ..core.field import FODField, MaskField
from ..core.integrate import mask_test, sd_move
from ..core.params import TrackParams
from ..core.stop import CONTINUE, Reason

Tensor = torch.Tensor

SEARCH_FWD, SEARCH_BWD, DONE = 1, 2, 3


def supported(params: TrackParams) -> bool:
    return not params.rk4 and params.peak_polish == 0


_COMPILED: dict = {}
PAD = 256            # CPU: the compiled move sees batch sizes rounded up to a multiple of this
GPU_BUCKET = 65536   # CUDA: sizes rounded up to a power of two, at least this


def _padded_size(n: int, cuda: bool) -> int:
    if cuda:   # few distinct shapes (one graph each where dynamic shapes are not honoured); GPUs are
        return max(GPU_BUCKET, 1 << (n - 1).bit_length())   # latency-bound below ~1e5 rows anyway
    return -(-n // PAD) * PAD


def compiled_move() -> Callable:
    """:func:`tractfunc.core.newton.newton_move` fused by ``torch.compile`` (``fullgraph=True``, dynamic
    batch size), compiled once per process.  2.9x faster per move for 10 000 directions, but slower in
    this driver on the CPU, whose ticks mostly carry small batches (docs/benchmarks.md); inductor
    reassociates sums, so float32 results differ from eager in the last bits.
    Batches are padded (:func:`_padded_size`) so that sizes 0 and 1 never reach the compiler and few
    distinct shapes do."""
    if "move" not in _COMPILED:
        fused = torch.compile(newton_move, dynamic=True, fullgraph=True)

        def move(coeffs: Tensor, u: Tensor, table):
            n = u.shape[0]
            m = _padded_size(n, u.is_cuda)
            if m != n:
                u = torch.cat([u, u.new_tensor([1.0, 0.0, 0.0]).expand(m - n, 3)])
                coeffs = torch.cat([coeffs, coeffs.new_zeros(m - n, coeffs.shape[-1])])
            with torch._dynamo.config.patch(recompile_limit=32):
                v, a, dt = fused(coeffs, u, table)
            return v[:n], a[:n], dt[:n]
        _COMPILED["move"] = move
    return _COMPILED["move"]


def track_halves(field: FODField, params: TrackParams, mask: Optional[MaskField], seeds: Tensor, dirs: Tensor,
                 move: Callable = newton_move):
    """Both halves of S accepted seeds.  seeds: (S, 3) mm; dirs: (S, 3) seed peak directions; move: the
    Newton move (:func:`compiled_move` for the fused version).

    Returns (fwd_rows, bwd_rows, reasons (S, 2)) where each rows = (streamline index blocks, position
    blocks) lists the vertices each half appended, one block per tick (so in step order per streamline)."""
    S = seeds.shape[0]
    dev = seeds.device
    sd = params.state_dtype
    c_seed = store(field.sample(seeds).values, sd)
    pos, dir = seeds.clone(), dirs.clone()
    coeffs, u = c_seed.clone(), dirs.clone()
    iters = torch.zeros(S, dtype=torch.long, device=dev)
    n = torch.ones(S, dtype=torch.long, device=dev)
    phase = torch.full((S,), SEARCH_FWD, dtype=torch.long, device=dev)
    reasons = torch.zeros(S, 2, dtype=torch.long, device=dev)
    rows = {SEARCH_FWD: ([], []), SEARCH_BWD: ([], [])}
    act = torch.arange(S, device=dev)
    nan = float("nan")
    while act.numel():
        v, a, dt = move(coeffs[act], u[act], field.table)
        v = store(v, sd)
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
            amp = torch.where(conv[fin], store(a[fin], sd), torch.full_like(a[fin], nan))
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
            cont = go & ~full
            # continuing streamlines: sample at the new point; leaving the image ends the half there
            fc = f[cont]
            if fc.numel():
                s = field.sample(new_pos[cont])
                pos[fc], dir[fc] = new_pos[cont], safe_dir[cont]
                coeffs[fc], u[fc], iters[fc] = store(s.values, sd), safe_dir[cont], 0
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
    return rows[SEARCH_FWD], rows[SEARCH_BWD], reasons
