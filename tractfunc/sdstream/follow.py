"""Follow given streamlines: recompute them with the PyTorch primitives, in any dtype, with their discrete
decisions held fixed.

An SD_Stream streamline is a piecewise-smooth function of the FOD, the seed and the step: smooth between
its discrete decisions -- which peak each Newton search climbs, and after how many steps each half stops
(cutoff, angle, mask, image, length).  A float64 tracker left to decide for itself takes a few of those
decisions differently from tckgen's float32 arithmetic (about 0.1 % of streamlines, where a decision sits
at rounding level: an amplitude within 1e-7 of the cutoff, a start between two peaks' basins), and the
streamline then goes elsewhere.

:func:`follow` takes the decisions from a reference tractogram -- the native kernel's, which are tckgen's
-- and evaluates everything else in the field's dtype: each step's peak is searched from the reference's
direction at that step (so it climbs the same peak, to the precision of the dtype), each half takes the
reference's number of steps, and each vertex is the usual Euler or RK4 move.  The result is tckgen's
streamline computed in float64 (or float32), differentiable wrt the FOD, the seeds and the step exactly
as the tracker is (peak derivatives by the implicit function theorem; the decisions are locally constant,
so they pass no derivative, as in hard tracking).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..core.field import FODField
from ..core.integrate import euler, rk4, unit
from ..core.params import TrackParams
from ..core.stop import CONTINUE

Tensor = torch.Tensor


class Followed(NamedTuple):
    """vertices: (V, 3) the followed streamlines, packed like the reference, in the field's dtype;
    faithful: (A,) bool, every step of the streamline was taken (False where a peak search failed or a
    step left the image in this dtype -- the streamline then stops moving there)."""
    vertices: Tensor
    faithful: Tensor


def follow_halves(field: FODField, params: TrackParams, seeds: Tensor, ref: Tensor, seed_row: Tensor,
                  steps: Tensor, sign: Tensor, start: Tensor):
    """Recompute half streamlines from ``seeds`` (H, 3) mm along the reference's decisions.

    ref: (V, 3) reference vertices, packed; seed_row: (H,) row of each half's seed in ``ref``; steps: (H,)
    steps of each half; sign: (H,) int64, -1 for a forward half (stored reversed, before the seed), +1 for
    a backward half; start: (H, 3) the direction each half starts from (the seed peak, negated for a
    backward half).

    Peak searches start where they land on the reference's peak: an Euler step searches from the
    reference's own direction of that step, ``d_k = unit(ref[row + sign (k+1)] - ref[row + sign k])``
    (it is that peak, to float32 rounding); the first three RK4 stages search from the incoming direction
    ``d_{k-1}`` (``start`` for k = 0) as tckgen does -- its stages sample other points, and the mean
    direction ``d_k`` can lie between two peaks' basins there -- and the fourth from the mean of stages
    two and three.  Halves are processed longest first, so the ones still stepping at step k are a prefix
    of the batch (no gather, no wasted peak searches).

    Returns (rows, positions, ok): lists of (c_k,) packed rows and (c_k, 3) new vertices per step, and
    (H,) bool, every step taken."""
    move = rk4 if params.rk4 else euler
    H = steps.numel()
    order = torch.argsort(steps, descending=True, stable=True)
    counts = torch.bincount(steps.cpu(), minlength=1)                # reference data: not traced
    active = (H - torch.cumsum(counts, 0)).tolist()                   # active[k]: halves with steps > k
    row, sgn = seed_row[order], sign[order]
    pos = seeds[order]
    prev = start[order].to(seeds.dtype)
    ok = torch.ones(H, dtype=torch.bool, device=seeds.device)
    rows, out = [], []
    for k in range(len(active) - 1):
        c = active[k]
        r0 = row[:c] + sgn[:c] * k
        r1 = r0 + sgn[:c]
        d = unit(ref[r1].to(torch.float64) - ref[r0].to(torch.float64)).to(seeds.dtype)
        m = move(field, params, pos[:c], prev[:c] if params.rk4 else d, early_exit=True, soft=True)
        ok = torch.cat([ok[:c] & (m.reason == CONTINUE), ok[c:]])
        pos = torch.cat([m.pos, pos[c:]])
        prev = d
        rows.append(r1)
        out.append(m.pos)
    return rows, out, ok[torch.argsort(order)]


def follow(field: FODField, params: TrackParams, seeds: Tensor, vertices: Tensor, lengths: Tensor,
           seed_index: Tensor, seed_dirs: Optional[Tensor] = None) -> Followed:
    """Recompute reference streamlines in ``field``'s dtype with their decisions held fixed.

    seeds: (A, 3) scanner mm, each streamline's seed, in the computation's dtype (may require grad);
    vertices, lengths, seed_index: the reference, packed as :class:`tractfunc.Tracks`
    (any float dtype; only its step directions, as starts for the peak searches, and its step counts are
    used); seed_dirs: (A, 3) the seed peak direction each forward half started from (tckgen's, e.g.
    :meth:`tractfunc.sdstream.native.Kernel.seed_steps`), used by RK4's first step only; None takes the first
    step's direction of each half instead.  ``params`` gives the step (may be a tensor) and the scheme; its stop
    rules are not applied (the reference took them).  Plain autograd flows to ``seeds``, ``field.sh``
    and a tensor step.  Both halves of every streamline run in one batch."""
    _check_reference(seeds, vertices, lengths, seed_index, seed_dirs)
    A = lengths.numel()
    seed_row = torch.cumsum(lengths, 0) - lengths + seed_index
    steps = torch.cat([seed_index, lengths - seed_index - 1])                     # forward halves, then backward
    sign = torch.cat([torch.full_like(seed_index, -1), torch.ones_like(seed_index)])
    row2 = seed_row.repeat(2)
    if seed_dirs is not None:
        start = torch.cat([seed_dirs, -seed_dirs]).to(torch.float64)
    else:   # each half's first step direction (any unit vector where the half takes no step)
        nxt = row2 + sign * (steps > 0).long()
        start = unit(vertices[nxt].double() - vertices[row2].double() + (steps == 0).unsqueeze(-1))
    rows, src, ok = follow_halves(field, params, seeds.repeat(2, 1), vertices, row2, steps, sign, start)
    out = seeds.new_zeros(vertices.shape[0], 3).index_copy(0, torch.cat([seed_row] + rows),
                                                           torch.cat([seeds] + src))
    return Followed(out, ok[:A] & ok[A:])


def _check_reference(seeds: Tensor, vertices: Tensor, lengths: Tensor, seed_index: Tensor,
                     seed_dirs: Optional[Tensor]) -> None:
    """Public-boundary validation of :func:`follow`'s reference (shapes and index ranges)."""
    from ..errors import TractfuncError
    if vertices.dim() != 2 or vertices.shape[-1] != 3 or not vertices.is_floating_point():
        raise TractfuncError(f"vertices has shape {tuple(vertices.shape)} ({vertices.dtype}); expected (V, 3) floats")
    if lengths.dim() != 1 or seed_index.shape != lengths.shape or seeds.shape != (lengths.numel(), 3):
        raise TractfuncError(f"lengths {tuple(lengths.shape)}, seed_index {tuple(seed_index.shape)} and seeds "
                             f"{tuple(seeds.shape)}: expected (A,), (A,) and (A, 3) for A streamlines")
    if int(lengths.sum()) != vertices.shape[0]:
        raise TractfuncError(f"lengths sum to {int(lengths.sum())} but there are {vertices.shape[0]} vertices")
    if bool(((seed_index < 0) | (seed_index >= lengths)).any()):
        raise TractfuncError("seed_index must lie in [0, length) for every streamline")
    if seed_dirs is not None and seed_dirs.shape != seeds.shape:
        raise TractfuncError(f"seed_dirs has shape {tuple(seed_dirs.shape)}; expected {tuple(seeds.shape)}")
