"""The eager engine: seeds in chunks, dead streamlines dropped from the batch between steps (active set), Newton
searches that exit early; the streamlines come back packed, assembled without a loop over streamlines.

Same steps as the fixed-shape reference (:mod:`tractfunc.sdstream.fixed`), bit for bit; only the bookkeeping
differs.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..core.field import FODField, MaskField
from ..core.params import TrackParams
from ..core.stop import Reason
from . import pipelined as pipelined_mod
from .step import TrackState, seed_peaks, step

Tensor = torch.Tensor


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


def track_chunk(field: FODField, params: TrackParams, mask: Optional[MaskField], seeds: Tensor, init_dirs: Tensor,
                pipelined: bool = True, compiled: bool = False):
    """Track one chunk of seeds with the eager engine.

    Args:
        seeds: (S, 3) scanner mm; init_dirs: (S, 3) unit start directions of the seed peak search.
        pipelined: schedule Newton searches per streamline (:mod:`tractfunc.sdstream.pipelined`: the same
            streamlines bit for bit, faster) where it applies (Euler, no polish, no gradient).
        compiled: fuse the pipelined Newton move with ``torch.compile``.
    Returns:
        (vertices (V, 3), lengths (A,), seed ids (A,), seed vertex indices (A,), reasons (S, 2), accepted (S,)).
    """
    B = seeds.shape[0]
    sd = seed_peaks(field, params, mask, seeds, init_dirs, early_exit=True, polish=params.peak_polish)
    ok_idx = torch.nonzero(sd.ok).squeeze(1)
    reasons = torch.full((B, 2), int(Reason.SEED_REJECTED), dtype=torch.long, device=seeds.device)
    s, d = seeds[ok_idx], sd.dir[ok_idx]
    if pipelined and pipelined_mod.supported(params) and not (s.requires_grad or field.sh.requires_grad):
        move = pipelined_mod.compiled_move() if compiled else pipelined_mod.newton_move
        frows, brows, rs = pipelined_mod.track_halves(field, params, mask, s, d, move)
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
