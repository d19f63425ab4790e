"""Which voxels each streamline visits, by tckmap's rules (MRtrix3 ``TrackMapperBase``).

Hard mapping, batched over all streamlines at once (no loop over streamlines), on float32 vertices as MRtrix3
reads them from a .tck:

* default: every (upsampled) vertex belongs to the voxel its float32 voxel coordinate rounds to; a streamline
  counts once in each voxel it has a vertex in (:func:`vertex_keys` + unique (streamline, voxel) pairs);
* ``-precise``: the streamline is followed as a chain of chords through its vertices; where two consecutive
  vertices lie in different voxels, the voxel boundary is found by bisection of the Hermite curve (tension 0.1)
  through the four surrounding vertices, to MRtrix3's accuracy (0.005 x the smallest voxel size), and the chord
  length inside each voxel is summed (a voxel visited twice gets both lengths) (:func:`precise_pieces`);
* ``-ends_only``: the voxels of the first and last vertex (one voxel holding both ends counts two).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .grid import Frame, Grid, realigned_coords, realigned_dims, unalign
from ..core.interpolate import flat_index, round_half_away
from .packed import first_mask, hermite, hermite_weights, last_mask, streamline_ids

Tensor = torch.Tensor

MAX_ROUNDS = 16   # voxel boundaries crossed between two vertices (corners); more is treated as one jump
MAX_BISECT = 64   # bisection steps (MRtrix3 stops at its accuracy, reached in ~5-25 steps)


class Pieces(NamedTuple):
    """Contributions of streamline pieces to voxels. sid: (P,) streamline; vox: (P, 3) realigned voxel;
    value: (P,) length in mm (precise) or 1; direction: (P, 3) float64 unit vector or NaN where undefined."""
    sid: Tensor
    vox: Tensor
    value: Tensor
    direction: Tensor


def vertex_voxels(verts: Tensor, fr: Frame) -> Tensor:
    """(V, 3) scanner mm -> (V, 3) long realigned voxel (std::round of the float32 coordinate)."""
    return round_half_away(realigned_coords(verts, fr)).long()


def to_flat(vox: Tensor, grid: Grid, fr: Frame):
    """Realigned voxels (..., 3) -> (flat index into the file-layout volume (...,) long, inside (...,) bool)."""
    d = torch.as_tensor(realigned_dims(grid, fr), device=vox.device)
    inside = ((vox >= 0) & (vox < d)).all(-1)
    ijk = unalign(vox, grid, fr)
    ijk = torch.minimum(ijk.clamp(min=0), torch.as_tensor(grid.dims, device=vox.device) - 1)
    return flat_index(ijk[..., 0], ijk[..., 1], ijk[..., 2], grid.dims), inside


def _unit64(v: Tensor) -> Tensor:
    """float32 difference -> float64 unit vector (Eigen's ``normalized()`` of the cast); NaN where zero."""
    v = v.double()
    n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return torch.where(n > 0, v / n, torch.full_like(v, float("nan")))


def vertex_pieces(verts: Tensor, lengths: Tensor, fr: Frame) -> Pieces:
    """Default mapping: one piece per vertex, value 1, with tckmap's tangent (next - previous vertex; the first
    and last use their one neighbour), NaN where that difference is zero."""
    V = verts.shape[0]
    first, last = first_mask(lengths, V), last_mask(lengths, V)
    idx = torch.arange(V, device=verts.device)
    nxt = verts[torch.where(last, idx, (idx + 1).clamp(max=max(V - 1, 0)))]
    prv = verts[torch.where(first, idx, (idx - 1).clamp(min=0))]
    d = _unit64(torch.where(last.unsqueeze(-1), verts, nxt) - prv)
    return Pieces(streamline_ids(lengths), vertex_voxels(verts, fr), torch.ones(V, dtype=torch.float64,
                                                                                device=verts.device), d)


def end_pieces(verts: Tensor, lengths: Tensor, fr: Frame) -> Pieces:
    """-ends_only: the first and the last vertex of each streamline (one piece for a single-vertex streamline);
    direction pointing out of the streamline (first - second, last - second last)."""
    V = verts.shape[0]
    first, last = first_mask(lengths, V), last_mask(lengths, V)
    idx = torch.arange(V, device=verts.device)
    inner_next = verts[(idx + 1).clamp(max=max(V - 1, 0))]
    inner_prev = verts[(idx - 1).clamp(min=0)]
    single = first & last
    d = torch.where(first.unsqueeze(-1), verts - inner_next, verts - inner_prev)
    d = torch.where(single.unsqueeze(-1), torch.zeros_like(d), d)
    keep = first | last
    sid = streamline_ids(lengths)
    return Pieces(sid[keep], vertex_voxels(verts[keep], fr), torch.ones(int(keep.sum()), dtype=torch.float64,
                                                                          device=verts.device), _unit64(d[keep]))


def _norm32(v: Tensor) -> Tensor:
    return torch.sqrt((v * v).sum(-1))


def precise_pieces(verts: Tensor, lengths: Tensor, grid: Grid, fr: Frame) -> Pieces:
    """-precise: the chord length of each streamline inside each voxel it crosses (float32 vertices, float64
    lengths as MRtrix3 sums them). Returns two kinds of piece in one set: length contributions (direction NaN,
    value = mm) and voxel visits (value 0, direction = unit(exit - entry)); summing values per (streamline,
    voxel) gives the length, summing |direction| gives tckmap -dec -precise's colour."""
    return _precise(verts, lengths, grid, fr)[0]


def precise_visits(verts: Tensor, lengths: Tensor, grid: Grid, fr: Frame) -> Pieces:
    """The voxel visits of -precise mapping, one piece per visit (entry to exit of one voxel, as MRtrix3's
    ``voxelise_precise`` emits them): value = the length inside the voxel during that visit (mm), direction =
    unit(exit - entry) (NaN where they coincide)."""
    pc, vis, n_vis = _precise(verts, lengths, grid, fr)
    is_len = torch.isnan(pc.direction).any(-1)
    length = torch.zeros(n_vis, dtype=torch.float64, device=verts.device).index_add_(0, vis[is_len], pc.value[is_len])
    d = ~is_len
    order = torch.argsort(vis[d])
    return Pieces(pc.sid[d][order], pc.vox[d][order], length[vis[d][order]], pc.direction[d][order])


def _precise(verts: Tensor, lengths: Tensor, grid: Grid, fr: Frame):
    """precise_pieces plus the visit each piece belongs to: (Pieces, visit id (P,), number of visits)."""
    dev = verts.device
    q = verts.to(torch.float32)
    n_ok = lengths >= 2
    keep_v = torch.repeat_interleave(n_ok, lengths)
    q, lengths = q[keep_v], lengths[n_ok]
    sid_all = torch.repeat_interleave(torch.arange(n_ok.numel(), device=dev)[n_ok], lengths)
    V = q.shape[0]
    if V == 0:
        z = torch.zeros(0, dtype=torch.long, device=dev)
        return Pieces(z, z.new_zeros(0, 3), torch.zeros(0, dtype=torch.float64, device=dev),
                      torch.zeros(0, 3, dtype=torch.float64, device=dev)), z, 0
    acc = (0.005 * min(grid.spacing)) ** 2
    first, last = first_mask(lengths, V), last_mask(lengths, V)
    r = vertex_voxels(q, fr)
    idx = torch.arange(V, device=dev)
    prev_i = (idx - 1).clamp(min=0)
    seg = ~first                                        # segment (k-1, k) ends at vertex k
    trans = seg & (r != r[prev_i]).any(-1)
    # contributions of chords between vertices of the same voxel
    plain = seg & ~trans
    chord = _norm32(q[prev_i] - q).double()
    sids, voxs, vals, dirs = [sid_all[plain]], [r[plain]], [chord[plain]], []
    run_start = first | trans
    run_of = torch.cumsum(run_start.long(), 0) - 1                # visit id of each vertex's run
    n_vis = int(run_start.sum())
    vis = [run_of[plain]]
    # Hermite control points of each transition segment: q_{k-2} (or 2 q0 - q1), q_{k-1}, q_k, q_{k+1} (or 2 q_n - q_{n-1})
    k = idx[trans]
    st = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    en = st + torch.repeat_interleave(lengths, lengths) - 1
    front = q[st] * 2.0 - q[(st + 1).clamp(max=V - 1)]
    back = q[en] * 2.0 - q[(en - 1).clamp(min=0)]
    a = torch.where((k - 1 == st[k]).unsqueeze(-1), front[k], q[(k - 2).clamp(min=0)])
    b, c = q[k - 1], q[k]
    d = torch.where((k == en[k]).unsqueeze(-1), back[k], q[(k + 1).clamp(max=V - 1)])
    target = r[k]
    this, entry = r[k - 1], b.clone()
    mu0 = torch.zeros(k.numel(), dtype=torch.float64, device=dev)
    going = torch.ones(k.numel(), dtype=torch.bool, device=dev)
    first_exit = torch.zeros_like(b)
    last_exit = c.clone()
    sk = sid_all[k]
    for rnd in range(MAX_ROUNDS):
        g = going.nonzero().squeeze(-1)
        if g.numel() == 0:
            break
        x, nv, mu_last = _bisect(a[g], b[g], c[g], d[g], this[g], entry[g], mu0[g], target[g], fr, acc)
        sids.append(sk[g]); voxs.append(this[g]); vals.append(_norm32(entry[g] - x).double())
        if rnd == 0:
            first_exit[g] = x
            vis.append(run_of[k[g] - 1])
        else:   # an intermediate voxel (a corner) is a visit of its own
            cid = n_vis + torch.arange(g.numel(), device=dev)
            n_vis += g.numel()
            vis.append(cid)
            dirs.append((sk[g], this[g], _unit64(x - entry[g]), cid))
        last_exit[g] = x
        done = (nv == target[g]).all(-1) | (rnd == MAX_ROUNDS - 1)
        going[g[done]] = False
        nd = g[~done]
        this[nd], entry[nd], mu0[nd] = nv[~done], x[~done], mu_last[~done]
    # the chord from the last boundary to q_k belongs to q_k's voxel
    sids.append(sk); voxs.append(target); vals.append(_norm32(last_exit - c).double())
    vis.append(run_of[k])
    # visits of vertex runs: entered at q_0 or the last boundary before the run, left at the first boundary after
    # it or at the last vertex
    seg_of = torch.full((V,), -1, dtype=torch.long, device=dev)
    seg_of[k] = torch.arange(k.numel(), device=dev)
    run_end = last | torch.cat([trans[1:], trans.new_zeros(1)])
    entry_v = torch.where(first.unsqueeze(-1), q, last_exit[seg_of.clamp(min=0)] if k.numel() else q)
    nxt_seg = seg_of[(idx + 1).clamp(max=V - 1)]
    exit_after = torch.where(last.unsqueeze(-1), q, first_exit[nxt_seg.clamp(min=0)] if k.numel() else q)
    s_i, e_i = idx[run_start], idx[run_end]
    dirs.append((sid_all[s_i], r[s_i], _unit64(exit_after[e_i] - entry_v[s_i]), run_of[s_i]))
    nan3 = lambda n: torch.full((n, 3), float("nan"), dtype=torch.float64, device=dev)   # noqa: E731
    sid = torch.cat(sids + [x[0] for x in dirs])
    vox = torch.cat(voxs + [x[1] for x in dirs])
    val = torch.cat(vals + [torch.zeros(x[0].numel(), dtype=torch.float64, device=dev) for x in dirs])
    dr = torch.cat([nan3(v.numel()) for v in sids] + [x[2] for x in dirs])
    return Pieces(sid, vox, val, dr), torch.cat(vis + [x[3] for x in dirs]), n_vis


def _bisect(a, b, c, d, this, entry, mu0, target, fr: Frame, acc: float):
    """One round of MRtrix3's boundary search on the Hermite curve (a, b, c, d) between ``entry`` (at mu0, in
    voxel ``this``) and c (mu = 1): -> (exit point (n, 3) float32, voxel after it (n, 3), last mu (n,))."""
    mu_min, mu_max, mu = mu0.clone(), torch.ones_like(mu0), mu0.clone()
    p_min, p_max = entry.clone(), c.clone()
    nv = target.clone()
    for _ in range(MAX_BISECT):
        active = ((p_min - p_max) ** 2).sum(-1).double() > acc
        if not bool(active.any()):
            break
        m = 0.5 * (mu_min + mu_max)
        w = hermite_weights(m.to(torch.float32))
        p = hermite(w, a, b, c, d)
        v = vertex_voxels(p, fr)
        same = (v == this).all(-1)
        lo, hi = active & same, active & ~same
        mu = torch.where(active, m, mu)
        mu_min = torch.where(lo, m, mu_min)
        p_min = torch.where(lo.unsqueeze(-1), p, p_min)
        mu_max = torch.where(hi, m, mu_max)
        p_max = torch.where(hi.unsqueeze(-1), p, p_max)
        nv = torch.where(hi.unsqueeze(-1), v, nv)
    return p_max, nv, mu
