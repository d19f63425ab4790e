"""FOD -> fixels (fod2fixel / tcksift2's FMLS segmentation) and streamline -> fixel lengths (tcksift2's mapping).

Segmentation (MRtrix3 ``FMLS::Segmenter`` with its defaults, read from MRtrix3 3.0.3 ``src/dwi/fmls.cpp``):

* the FOD is sampled on 1281 directions: one of each antipodal pair of the vertices of an icosahedron
  (vertices ``(+-phi, +-1, 0)``, ``(+-1, 0, +-phi)``, ``(0, +-phi, +-1)``) subdivided four times (edge midpoints
  pushed to the sphere), two directions adjacent where they share an edge of that triangulation;
* each sample carries an integration weight: the least-squares weights that integrate every even spherical
  harmonic up to degree 50 exactly over the sphere;
* samples are visited in decreasing absolute amplitude; a sample joins the one same-sign lobe it is adjacent to,
  starts a new lobe if it is adjacent to none, and, adjacent to several (the merge ratio 1.0 never merges), is
  attributed to the first (largest-peak) of them at the end without becoming part of the adjacency;
* positive lobes are kept whose peak amplitude (refined by Newton iteration on the sphere from the sampled peak)
  is at least 0.1; a fixel's integral (AFD) is the weighted sum of its samples' amplitudes and its direction
  their amplitude-weighted mean (signs aligned as the lobe grows);
* for streamline mapping, each voxel's direction -> fixel lookup table is dilated so that every direction
  belongs to a fixel: unassigned directions take, ring after ring, the fixel of an assigned neighbour (the one
  with the largest integral where several compete).

Mapping (``SIFT::Model::map_streamlines``): the streamline is upsampled as ``tckmap -precise`` and cut into voxel
visits (:func:`tractfunc.maps.voxelise.precise_visits`); each visit goes to the fixel of its voxel whose lookup
table holds the direction nearest (largest ``|cos|``) its entry -> exit vector; visits of one streamline to one
(voxel, direction) add up; lengths are stored in 8 bits (``round(255 x length / voxel diagonal)``, lengths below
half a step dropped) and summed per (streamline, fixel).
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..core import sh
from ..core.newton import peak as newton_peak
from ..errors import TractfuncError
from .grid import Grid, frame, make_grid
from .packed import packed, upsample as hermite_upsample, upsample_ratio
from .tdi import chunks
from .voxelise import precise_visits, to_flat

Tensor = torch.Tensor

PEAK_VALUE_THRESHOLD = 0.1   # FMLS_PEAK_VALUE_THRESHOLD_DEFAULT
INTEGRAL_THRESHOLD = 0.0     # FMLS_INTEGRAL_THRESHOLD_DEFAULT
VOXEL_CHUNK = 16384          # voxels segmented at once (each holds 1281 float64 samples)


# ------------------------------------------------------------------------------------------- direction set

@lru_cache(maxsize=None)
def direction_set():
    """The 1281-direction hemisphere set and its adjacency: (dirs (1281, 3) float64 unit, adjacency (1281, 6)
    int64 neighbour indices padded with -1, integration weights (1281,) float64).

    The directions are the subdivided icosahedron's with their azimuth and elevation rounded to 5 decimals, the
    precision MRtrix3 tabulates its set in (:func:`_rounded_directions`; this reproduces 1273 of its 1281 entries,
    the other 8 lie on a rounding boundary and differ by 1e-5 rad).  The integration weights are a least-squares
    fit of degree 50 on these points (condition number ~5e4), so such roundings move them, and the lobe integrals,
    by up to a few percent: measured against fod2fixel, AFD within 3.6 % (median 0.19 %), directions within 0.44
    degrees, the same fixels in every voxel."""
    dirs = _rounded_directions(_icosphere_half())
    return dirs, _adjacency(dirs), _integration_weights(dirs)


def _rounded_directions(dirs: np.ndarray) -> np.ndarray:
    """``dirs`` (N, 3) unit, each with its azimuth in [-pi, pi) and elevation (from +z, on the upper hemisphere)
    rounded to 5 decimals; signs kept."""
    v = np.where(dirs[:, 2:3] < 0, -dirs, dirs)
    az = np.arctan2(v[:, 1], v[:, 0])
    az = np.round(np.where(az > np.pi - 1e-9, -np.pi, az), 5)
    el = np.round(np.arccos(np.clip(v[:, 2], -1.0, 1.0)), 5)
    m = np.stack([np.cos(az) * np.sin(el), np.sin(az) * np.sin(el), np.cos(el)], 1)
    return m * np.sign((dirs * m).sum(1))[:, None]


def _adjacency(dirs: np.ndarray) -> np.ndarray:
    """(N, W) neighbour indices (padded with -1): directions sharing an edge of the convex hull of +-dirs (as
    MRtrix3's ``Set::initialise_adjacency``)."""
    from scipy.spatial import ConvexHull
    n = len(dirs)
    tri = ConvexHull(np.concatenate([dirs, -dirs])).simplices % n
    nb = [set() for _ in range(n)]
    for t in tri:
        for i, j in ((0, 1), (1, 2), (2, 0)):
            if t[i] != t[j]:
                nb[t[i]].add(t[j])
                nb[t[j]].add(t[i])
    adj = np.full((n, max(len(x) for x in nb)), -1, dtype=np.int64)
    for i, x in enumerate(nb):
        adj[i, :len(x)] = sorted(x)
    return adj


def _icosphere_half() -> np.ndarray:
    """(1281, 3) vertices of the four-times subdivided icosahedron, one of each antipodal pair."""
    from scipy.spatial import ConvexHull
    phi = (1.0 + 5.0 ** 0.5) / 2.0
    base = []
    for a in (1.0, -1.0):
        for b in (1.0, -1.0):
            base += [(a * phi, b, 0.0), (a, 0.0, b * phi), (0.0, a * phi, b)]
    v = np.array(base, dtype=np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    tri = ConvexHull(v).simplices
    for _ in range(4):
        v, tri = _subdivide(v, tri)
    key = np.round(v, 9) + 0.0
    upper = (key[:, 2] > 0) | ((key[:, 2] == 0) & ((key[:, 1] > 0) | ((key[:, 1] == 0) & (key[:, 0] > 0))))
    return v[upper]


def _subdivide(v: np.ndarray, tri: np.ndarray):
    """One 4-to-1 subdivision of a triangulated unit sphere (edge midpoints normalised)."""
    edges = {}
    verts = list(v)

    def mid(i, j):
        k = (min(i, j), max(i, j))
        if k not in edges:
            m = v[i] + v[j]
            verts.append(m / np.linalg.norm(m))
            edges[k] = len(verts) - 1
        return edges[k]
    out = []
    for a, b, c in tri:
        ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
        out += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
    return np.array(verts), np.array(out)


def _integration_weights(dirs: np.ndarray) -> np.ndarray:
    """Least-squares weights w (N,) with sum_d w_d Y(d) = integral of Y over the sphere for every even SH up to
    degree lmax(N) + 2 (MRtrix3 ``FMLS::IntegrationWeights``)."""
    l_cal = _l_for_n(len(dirs)) + 2
    B = sh.basis(torch.from_numpy(dirs), l_cal).numpy()          # (N, K)
    target = np.zeros(B.shape[1])
    target[0] = 2.0 * np.sqrt(np.pi)
    return torch.linalg.lstsq(torch.from_numpy(B.T), torch.from_numpy(target)[:, None]).solution[:, 0].numpy()


def _l_for_n(n: int) -> int:
    """MRtrix3 ``SH::LforN``: the largest even degree whose coefficient count fits in n."""
    return 2 * int(np.floor((np.sqrt(1.0 + 8.0 * n) - 3.0) / 4.0))


def nearest_direction(u: Tensor) -> Tensor:
    """(..., 3) vectors -> (...,) int64 index of the set direction with the largest |cos| (select_direction)."""
    dirs = torch.as_tensor(direction_set()[0], dtype=torch.float64, device=u.device)
    flat = u.reshape(-1, 3).double()
    out = [(flat[i:i + 65536] @ dirs.T).abs().argmax(-1) for i in range(0, flat.shape[0], 65536)]
    return (torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=u.device)).reshape(u.shape[:-1])


# ------------------------------------------------------------------------------------------- segmentation

class Fixels(NamedTuple):
    """Fixels of a FOD image. voxel: (J,) flat voxel index (file layout); direction: (J, 3) unit mean direction
    (scanner frame); integral: (J,) FOD integral (AFD); peak: (J,) peak amplitude; weight: (J,) processing-mask
    value of the voxel; first: (X*Y*Z,) first fixel of each voxel (-1 none); count: (X*Y*Z,) fixels per voxel;
    lut: (M, 1281) int16 fixel-within-voxel of each direction for the M voxels with >= 2 fixels (dilated);
    lut_row: (X*Y*Z,) row of lut (-1: a voxel with 0 or 1 fixel); grid: the FOD's grid; members: (2, P) int64
    (fixel, direction) pairs of every fixel's lobe samples (``segment(..., members=True)``; else None), what
    :func:`fixel_integrals` sums."""
    voxel: Tensor
    direction: Tensor
    integral: Tensor
    peak: Tensor
    weight: Tensor
    first: Tensor
    count: Tensor
    lut: Tensor
    lut_row: Tensor
    grid: Grid
    members: Optional[Tensor] = None


def segment(fod, affine, mask=None, *, spacing=None, peak_threshold: float = PEAK_VALUE_THRESHOLD,
            integral_threshold: float = INTEGRAL_THRESHOLD, refine_peaks: bool = True,
            members: bool = False) -> Fixels:
    """FMLS segmentation of every voxel's FOD into fixels (fod2fixel's integrals and mean directions;
    tcksift2's model with its dilated lookup tables).

    Args:
        fod: (X, Y, Z, C) SH coefficients (MRtrix3 basis, even degrees), any float dtype (array or tensor).
        affine: (4, 4) voxel -> scanner mm; spacing: (3,) voxel sizes (default the affine's column norms).
        mask: (X, Y, Z) processing-mask weights or None (then 1 where the first coefficient is non-zero and finite,
            tcksift2's default); voxels with weight 0 are not segmented.
        peak_threshold / integral_threshold: fod2fixel's -fmls_peak_value / -fmls_integral.
        refine_peaks: refine each lobe's peak amplitude by Newton iteration before thresholding (as MRtrix3).
        members: also record each fixel's lobe samples (``Fixels.members``, for :func:`fixel_integrals`: the
            integrals as a differentiable function of the SH coefficients).
    Returns:
        :class:`Fixels`, fixels ordered by voxel (file layout, C order) then by decreasing peak; float64, CPU.
    """
    fod = torch.as_tensor(np.asarray(fod) if not isinstance(fod, Tensor) else fod).detach().cpu().double()
    if fod.ndim != 4:
        raise TractfuncError(f"FOD has shape {tuple(fod.shape)}; expected (X, Y, Z, C) SH coefficients")
    C = fod.shape[3]
    lmax = sh.lmax_for(C)
    if sh.n_coeffs(lmax) != C:
        raise TractfuncError(f"FOD has {C} volumes; expected an even-degree SH count (1, 6, 15, 28, 45, ...)")
    grid = make_grid(affine, fod.shape[:3], spacing)
    flat = fod.reshape(-1, C)
    if mask is None:
        w = ((flat[:, 0] != 0) & torch.isfinite(flat[:, 0])).double()
    else:
        w = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask).detach().cpu().double()
        if tuple(w.shape) != tuple(fod.shape[:3]):
            raise TractfuncError(f"processing mask has shape {tuple(w.shape)}; expected the FOD's grid "
                                 f"{tuple(fod.shape[:3])}")
        w = w.reshape(-1)
    vox = torch.nonzero((w != 0) & (flat[:, 0] > 0) & torch.isfinite(flat[:, 0])).squeeze(-1)
    dirs_np, adj_np, iw_np = direction_set()
    dirs, adj, iw = torch.from_numpy(dirs_np), torch.from_numpy(adj_np), torch.from_numpy(iw_np)
    B = sh.basis(dirs, lmax)                                                     # (N, C)
    parts = [_segment_block(flat[vox[i:i + VOXEL_CHUNK]], vox[i:i + VOXEL_CHUNK], B, dirs, adj, iw, lmax,
                            peak_threshold, integral_threshold, refine_peaks)
             for i in range(0, vox.numel(), VOXEL_CHUNK)]
    cat = lambda k: torch.cat([p[k] for p in parts]) if parts else None   # noqa: E731
    nvox = grid.n_voxels
    if not parts:
        z = torch.zeros(0, dtype=torch.float64)
        return Fixels(torch.zeros(0, dtype=torch.long), z.reshape(0, 3), z, z, z, torch.full((nvox,), -1),
                      torch.zeros(nvox, dtype=torch.long), torch.zeros(0, len(dirs), dtype=torch.int16),
                      torch.full((nvox,), -1), grid)
    fv, fdir, fint, fpeak = cat(0), cat(1), cat(2), cat(3)
    lut_vox, lut = cat(4), cat(5)
    pairs = None
    if members:   # block-local fixel indices -> global ones
        offsets = torch.cumsum(torch.tensor([0] + [p[0].numel() for p in parts[:-1]]), 0)
        pairs = torch.cat([p[6] + torch.stack([o, torch.zeros_like(o)])[:, None] for p, o in zip(parts, offsets)], 1)
    count = torch.zeros(nvox, dtype=torch.long).index_add_(0, fv, torch.ones_like(fv))
    first = torch.where(count > 0, torch.cumsum(count, 0) - count, torch.full_like(count, -1))
    lut_row = torch.full((nvox,), -1, dtype=torch.long)
    lut_row[lut_vox] = torch.arange(lut_vox.numel())
    return Fixels(fv, fdir, fint, fpeak, w[fv], first, count, lut, lut_row, grid, pairs)


def _segment_block(coef, vox, B, dirs, adj, iw, lmax, peak_threshold, integral_threshold, refine):
    """Segment M voxels at once (a loop over the amplitude rank, batched over voxels)."""
    M, N = coef.shape[0], B.shape[0]
    vals = coef @ B.T                                                            # (M, N)
    # negative samples only ever form negative lobes (dropped): visit the positive ones, largest first
    order = torch.argsort(-vals, dim=1, stable=True)
    top = vals.gather(1, vals.abs().argmax(1, keepdim=True)).squeeze(1) > 0      # largest |amp| must be > 0
    npos = (vals > 0).sum(1) * top
    label = torch.full((M, N), -1, dtype=torch.long)                             # lobe of each member sample
    late = torch.full((M, N), -1, dtype=torch.long)                              # deferred (bridge) samples
    n_lobes = torch.zeros(M, dtype=torch.long)
    K = 8
    mean = torch.zeros(M, K, 3, dtype=torch.float64)
    seed = torch.zeros(M, K, dtype=torch.long)
    rows = torch.arange(M)
    for r in range(int(npos.max()) if M else 0):
        act = r < npos
        if not bool(act.any()):
            break
        m = rows[act]
        d = order[m, r]
        nb = adj[d]                                                              # (m, 6)
        nl = torch.where(nb >= 0, label[m[:, None], nb.clamp(min=0)], torch.full_like(nb, -1))
        has = nl >= 0
        big = torch.iinfo(torch.long).max
        lo = torch.where(has, nl, torch.full_like(nl, big)).min(1).values
        hi = nl.max(1).values
        new = ~has.any(1)
        join = ~new & (lo == hi)
        bridge = ~new & (lo != hi)
        lobe = torch.where(new, n_lobes[m], lo)
        if int(n_lobes.max()) + 1 >= K:                                          # grow the per-voxel lobe slots
            mean = torch.cat([mean, torch.zeros(M, K, 3, dtype=torch.float64)], 1)
            seed = torch.cat([seed, torch.zeros(M, K, dtype=torch.long)], 1)
            K *= 2
        nm, nj, nbr = m[new], m[join], m[bridge]
        seed[nm, n_lobes[nm]] = d[new]
        n_lobes[nm] += 1
        mj = torch.cat([nm, nj])
        dj = torch.cat([d[new], d[join]])
        lj = torch.cat([lobe[new], lobe[join]])
        label[mj, dj] = lj
        amp = vals[mj, dj] * iw[dj]
        u = dirs[dj]
        cur = mean[mj, lj]
        sgn = torch.where((cur * u).sum(-1) > 0, 1.0, -1.0)
        sgn = torch.where((cur == 0).all(-1), torch.ones_like(sgn), sgn)         # a new lobe: its peak direction
        mean[mj, lj] = cur + u * (sgn * amp.abs())[:, None]
        late[nbr, d[bridge]] = lobe[bridge]
    # deferred samples join the first adjacent lobe
    lm, ld = torch.nonzero(late >= 0, as_tuple=True)
    ll = late[lm, ld]
    cur = mean[lm, ll]
    u = dirs[ld]
    sgn = torch.where((cur * u).sum(-1) > 0, 1.0, -1.0)
    mean.index_put_((lm, ll), u * (sgn * (vals[lm, ld] * iw[ld]).abs())[:, None], accumulate=True)
    member = torch.where(late >= 0, late, label)                                 # (M, N) final lobe or -1
    K = mean.shape[1]
    integ = torch.zeros(M * K, dtype=torch.float64)
    ok = member >= 0
    mm = torch.nonzero(ok, as_tuple=True)
    integ.index_add_(0, (mm[0] * K + member[ok]), (vals[ok] * iw[mm[1]]).abs())
    integ = integ.reshape(M, K)
    exists = torch.arange(K)[None, :] < n_lobes[:, None]
    pk_dir = dirs[seed]                                                          # (M, K, 3)
    pk_val = vals.gather(1, seed)
    low = exists & (pk_val < peak_threshold) & (pk_val >= 0.8 * peak_threshold)   # refinement raises a sampled peak by < 20 %
    if refine and bool(low.any()):
        em = torch.nonzero(low, as_tuple=True)
        p = newton_peak(coef[em[0]], pk_dir[em])
        ok_p = torch.isfinite(p.amp) & torch.isfinite(p.dir).all(-1)
        near = nearest_direction(torch.where(ok_p[:, None], p.dir, pk_dir[em]))
        inside = member[em[0], near] == em[1]
        use = ok_p & inside
        pk_val[em] = torch.where(use, p.amp.double(), pk_val[em])
    keep = exists & (integ >= integral_threshold) & (pk_val >= peak_threshold) & (pk_val > 0)
    # compact kept lobes per voxel, in creation (decreasing sampled peak) order
    new_idx = torch.cumsum(keep.long(), 1) - 1
    nkeep = keep.sum(1)
    km = torch.nonzero(keep, as_tuple=True)
    fdir = mean[km]
    fdir = fdir / torch.linalg.vector_norm(fdir, dim=-1, keepdim=True)
    fv, fint, fpeak = vox[km[0]], integ[km], pk_val[km]
    # dilated lookup tables of voxels with >= 2 fixels
    multi = torch.nonzero(nkeep >= 2).squeeze(-1)
    mem = member[multi]
    kidx = torch.where(mem >= 0, new_idx[multi[:, None], mem.clamp(min=0)], torch.full_like(mem, -1))
    kidx = torch.where((mem >= 0) & keep[multi[:, None], mem.clamp(min=0)], kidx, torch.full_like(kidx, -1))
    lut = _dilate(kidx, integ[multi].gather(1, _kept_slots(keep[multi], K)), adj)
    # (fixel, direction) pairs of the kept lobes' samples, fixels numbered as km orders them
    glob = torch.where(keep, new_idx + (torch.cumsum(nkeep, 0) - nkeep)[:, None], torch.full_like(new_idx, -1))
    pm, pd = torch.nonzero(ok, as_tuple=True)
    pf = glob[pm, member[pm, pd]]
    sel = pf >= 0
    return fv, fdir, fint, fpeak, vox[multi], lut.to(torch.int16), torch.stack([pf[sel], pd[sel]])


def _kept_slots(keep: Tensor, K: int) -> Tensor:
    """(M, K) bool -> (M, K) lobe slot of the k-th kept lobe (padded with 0)."""
    idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    return torch.where(torch.arange(K)[None, :] < keep.sum(1, keepdim=True), idx, torch.zeros_like(idx))


def _dilate(lut: Tensor, integ: Tensor, adj: Tensor) -> Tensor:
    """MRtrix3's lookup-table dilation: (M, N) fixel per direction (-1 unassigned), (M, K) fixel integrals ->
    (M, N) with every direction assigned, ring after ring (largest integral among assigned neighbours; all
    directions of one ring are decided from the previous rings)."""
    M, N = lut.shape
    flat = lut.reshape(-1).clone()
    todo = torch.nonzero(flat < 0).squeeze(-1)
    while todo.numel():
        m, d = todo // N, todo % N
        nb = adj[d]                                                             # (U, 6)
        nl = torch.where(nb >= 0, flat[m[:, None] * N + nb.clamp(min=0)], torch.full_like(nb, -1))
        val = torch.where(nl >= 0, integ[m[:, None], nl.clamp(min=0)], torch.full(nl.shape, -1.0, dtype=integ.dtype))
        cand = nl.gather(1, val.argmax(1, keepdim=True)).squeeze(1)
        upd = cand >= 0
        if not bool(upd.any()):
            break
        flat[todo[upd]] = cand[upd]
        todo = todo[~upd]
    return flat.reshape(M, N)


# ------------------------------------------------------------------------------------------- mapping

class Contributions(NamedTuple):
    """Streamline -> fixel lengths. sid: (P,) streamline; fixel: (P,) fixel index; length: (P,) mm (tcksift2's
    8-bit storage when quantised); total_length: (A,) mm of every visit; total_contribution: (A,) processing-mask
    weighted length of the visits that reach a fixel (unquantised)."""
    sid: Tensor
    fixel: Tensor
    length: Tensor
    total_length: Tensor
    total_contribution: Tensor


def fixel_of(fx: Fixels, flat: Tensor, inside: Tensor, dirbin: Tensor) -> Tensor:
    """Fixel of (voxel, direction bin) pairs: flat (P,) voxel index, inside (P,) bool, dirbin (P,) -> (P,) fixel
    index or -1 (dixel2fixel with the dilated lookup table)."""
    f0 = torch.where(inside, fx.first[flat.clamp(min=0)], torch.full_like(flat, -1))
    row = torch.where(inside, fx.lut_row[flat.clamp(min=0)], torch.full_like(flat, -1))
    off = torch.where(row >= 0, fx.lut[row.clamp(min=0), dirbin].long(), torch.zeros_like(row))
    return torch.where(f0 >= 0, f0 + off, torch.full_like(f0, -1))


def storage_scale(grid: Grid) -> float:
    """tcksift2's length storage step: voxel diagonal / 255 (float32 as MRtrix3 holds it)."""
    diag = float(np.float32(np.sqrt(np.float32(grid.spacing[0]) ** 2 + np.float32(grid.spacing[1]) ** 2
                                    + np.float32(grid.spacing[2]) ** 2)))
    return float(np.float32(diag / np.float32(255.0)))


def map_streamlines(tracks, fx: Fixels, *, step_size: Optional[float] = None, upsample: Optional[int] = None,
                    quantise: bool = True, chunk_vertices: int = 2_000_000) -> Contributions:
    """tcksift2's streamline -> fixel mapping (precise lengths, fixel by direction), batched over streamlines.

    Args:
        tracks: Tracks / TrackFile / (vertices (V, 3) scanner mm, lengths (A,)); mapped in float32.
        fx: :class:`Fixels` of the FOD (:func:`segment`).
        step_size: the tractogram's step size (mm; sets the upsampling as ``tckmap -precise``) or ``upsample``.
        quantise: store lengths in tcksift2's 8 bits (True) or keep them exact.
    Returns: :class:`Contributions`, one entry per (streamline, fixel), sorted by streamline (CPU, float64).
    """
    P = packed(tracks)
    grid, fr = fx.grid, frame(fx.grid)
    ratio = int(upsample) if upsample is not None else upsample_ratio(step_size, min(grid.spacing), True)
    scale = storage_scale(grid)
    A = P.lengths.numel()
    tot_len = torch.zeros(A, dtype=torch.float64)
    tot_con = torch.zeros(A, dtype=torch.float64)
    out = []
    J = fx.voxel.numel()
    for first, last, v0, v1 in chunks(P.lengths.cpu(), chunk_vertices // max(ratio, 1)):
        verts, lengths, _ = hermite_upsample(P.vertices[v0:v1].detach().cpu().to(torch.float32),
                                             P.lengths[first:last].cpu(), ratio)
        sid, vx, ln, dr = precise_visits(verts, lengths, grid, fr)
        ok = torch.isfinite(dr).all(-1)
        sid, vx, ln, dr = sid[ok], vx[ok], ln[ok], dr[ok]
        flat, inside = to_flat(vx, grid, fr)
        tot_len.index_add_(0, sid + first, ln.where(inside, torch.zeros_like(ln)))
        bins = nearest_direction(dr)
        # SetDixel: one entry per (streamline, voxel, direction bin), lengths summed
        N = len(direction_set()[0])
        key = ((sid * grid.n_voxels + flat) * N + bins)[inside]
        uk, inv = torch.unique(key, return_inverse=True)
        dl = torch.zeros(uk.numel(), dtype=torch.float64).index_add_(0, inv, ln[inside])
        dsid = uk // (grid.n_voxels * N)
        dflat = (uk // N) % grid.n_voxels
        dbin = uk % N
        fix = fixel_of(fx, dflat, torch.ones_like(dflat, dtype=torch.bool), dbin)
        has = fix >= 0
        if quantise:
            keep = has & (dl.float() > float(np.float32(0.5 * scale)))
            q = torch.round(dl.float() / np.float32(scale)).clamp(max=255).double()
        else:
            keep, q = has, dl
        tot_con.index_add_(0, dsid[keep] + first, dl[keep] * fx.weight[fix[keep]])
        k2 = dsid[keep] * J + fix[keep]
        u2, inv2 = torch.unique(k2, return_inverse=True)
        L = torch.zeros(u2.numel(), dtype=torch.float64).index_add_(0, inv2, q[keep])
        out.append((u2 // J + first, u2 % J, L * scale if quantise else L))
    sid = torch.cat([o[0] for o in out]) if out else torch.zeros(0, dtype=torch.long)
    fix = torch.cat([o[1] for o in out]) if out else torch.zeros(0, dtype=torch.long)
    ln = torch.cat([o[2] for o in out]) if out else torch.zeros(0, dtype=torch.float64)
    return Contributions(sid, fix, ln, tot_len, tot_con)


def soft_lengths(tracks, fx: Fixels, *, tau: float = 0.1):
    """Differentiable streamline -> fixel lengths: each chord (consecutive vertices) contributes its length
    times the smoothed voxel membership (:func:`tractfunc.maps.tdi.memberships`, edge softness ``tau`` voxels) of
    its midpoint to the fixel its direction selects in each voxel around it. -> the hard chord lengths per
    (streamline, fixel) as tau -> 0 (without tcksift2's boundary splitting and 8-bit storage).

    Args: tracks as :func:`map_streamlines` (vertices may require grad); fx: :class:`Fixels`.
    Returns: (sid (P,), fixel (P,), length (P,) differentiable in the vertices, in their dtype)."""
    from .packed import last_mask, streamline_ids
    from .tdi import memberships
    if not tau > 0:
        raise TractfuncError(f"tau {tau}: expected a positive kernel softness in voxels")
    P = packed(tracks)
    verts, lengths = P.vertices, P.lengths
    V = verts.shape[0]
    seg = ~last_mask(lengths, V)
    a, b = verts[seg], verts[torch.arange(V, device=verts.device)[seg] + 1]
    sid = streamline_ids(lengths)[seg]
    flat, inside, k = memberships(0.5 * (a + b), fx.grid, tau)                 # (n, 27)
    bins = nearest_direction((b - a).detach().cpu()).to(verts.device)
    fix = fixel_of(fx, flat.cpu(), inside.cpu(), bins[:, None].expand_as(flat).cpu()).to(verts.device)
    val = k * torch.linalg.vector_norm(b - a, dim=-1)[:, None]
    ok = fix >= 0
    J = fx.voxel.numel()
    key = (sid[:, None] * J + fix)[ok]
    uk, inv = torch.unique(key, return_inverse=True)
    L = torch.zeros(uk.numel(), dtype=verts.dtype, device=verts.device).index_add(0, inv, val[ok])
    return uk // J, uk % J, L


def fixel_integrals(fod: Tensor, fx: Fixels) -> Tensor:
    """The fixels' FOD integrals as a differentiable function of the SH coefficients, the lobes held fixed.

    Args:
        fod: (X, Y, Z, C) SH coefficients (the image :func:`segment` was given, or a perturbation of it), any float
            dtype, may require grad; fx: ``segment(..., members=True)``.
    Returns:
        (J,) sum over each fixel's lobe samples d of ``|iw_d * sum_k c_k Y_k(d)|`` (``fx.integral`` at the segmented
        FOD), in the FOD's dtype; its gradient is ``sign * iw_d * Y_k(d)`` into the fixel's voxel: the FOD end of
        SIFT2's implicit gradient (:func:`tractfunc.maps.sift2.soft_sift2` takes the integrals).
    """
    if fx.members is None:
        raise TractfuncError("fixel_integrals needs the lobe samples: segment(..., members=True)")
    dirs_np, _, iw_np = direction_set()
    C = fod.shape[-1]
    B = sh.basis(torch.from_numpy(dirs_np).to(fod.dtype), sh.lmax_for(C))       # (N, C)
    f, d = fx.members[0], fx.members[1]
    coef = fod.reshape(-1, C)[fx.voxel.to(fod.device)[f]]                       # (P, C)
    amp = (coef * B.to(fod.device)[d]).sum(-1) * torch.from_numpy(iw_np).to(fod)[d]
    return torch.zeros(fx.voxel.shape[0], dtype=fod.dtype, device=fod.device).index_add(0, f, amp.abs())
