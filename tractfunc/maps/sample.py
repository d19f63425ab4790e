"""A scalar image sampled along each streamline: ``tcksample -stat_tck`` (hard) and a smooth relaxation (soft).

Each vertex takes the image's trilinear value (MRtrix3's ``Interp::Linear``: zero outside the image, edge
clamp; :func:`tractfunc.core.interpolate.trilinear`) or, with ``interp="nearest"``, the nearest voxel's value
(tcksample -nointerp). Per streamline:

  mean    length-weighted: vertex i weighs half the length of its two adjacent segments (tcksample's rule,
          which down-weights the ends)
  median  unweighted median of the vertex values (the mean of the two middle values for an even count)
  min     smallest vertex value; max: largest

The hard mean is already differentiable in the vertices and the image (trilinear sampling); :func:`soft_stat`
relaxes min and max to a log-sum-exp at ``temperature`` (-> min / max as temperature -> 0) and weighs the mean
by survival weights (soft stopping).
"""
from __future__ import annotations

import torch

from ..core.arrays import as_tensor
from ..core.interpolate import nearest_value, to_voxel, trilinear
from ..errors import TractfuncError
from .packed import last_mask, packed, padded_index, segment_lengths, sequential_sum32, streamline_ids

Tensor = torch.Tensor
STATS = ("mean", "median", "min", "max")


def vertex_values(verts: Tensor, image: Tensor, affine, interp: str = "linear") -> Tensor:
    """(V, 3) scanner mm -> (V,) image values, in the image's dtype; differentiable in both (linear).
    image: (X, Y, Z); affine: (4, 4) voxel -> scanner mm (the image's own grid); voxel coordinates in float64."""
    A = torch.as_tensor(as_tensor(affine), dtype=torch.float64, device=verts.device)
    vox = to_voxel(verts, torch.linalg.inv(A))
    if interp == "nearest":
        return nearest_value(image, vox)
    return trilinear(image.unsqueeze(-1), vox).values[..., 0]


def vertex_lengths(verts: Tensor, lengths: Tensor) -> Tensor:
    """(V,) half the summed length of the segments on either side of each vertex (tcksample's mean weights)."""
    before = segment_lengths(verts, lengths)
    after = torch.cat([before[1:], before.new_zeros(1)])[:before.shape[0]]
    after = torch.where(last_mask(lengths, before.shape[0]), torch.zeros_like(after), after)
    return 0.5 * (before + after)


def _check(stat: str, interp: str, image) -> Tensor:
    if stat not in STATS:
        raise TractfuncError(f"statistic {stat!r}: expected one of {', '.join(STATS)}")
    if interp not in ("linear", "nearest"):
        raise TractfuncError(f"interpolation {interp!r}: expected linear or nearest")
    image = as_tensor(image)
    if image.ndim == 4 and image.shape[3] == 1:
        image = image[..., 0]
    if image.ndim != 3:
        raise TractfuncError(f"image has shape {tuple(image.shape)}; expected a 3-D scalar image")
    return image


def _segment_mean(x: Tensor, w: Tensor, sid: Tensor, A: int) -> Tensor:
    num = torch.zeros(A, dtype=x.dtype, device=x.device).index_add(0, sid, x * w)
    den = torch.zeros(A, dtype=x.dtype, device=x.device).index_add(0, sid, w)
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def sample_stat(tracks, image, affine, stat: str = "mean", interp: str = "linear") -> Tensor:
    """tcksample -stat_tck on packed streamlines.

    Args:
        tracks: :class:`tractfunc.Tracks`, :class:`tractfunc.TrackFile` or (vertices (V, 3), lengths (A,)),
            scanner mm. image: (X, Y, Z) scalar image (array or tensor); affine: its (4, 4) voxel -> scanner mm.
        stat: "mean" (length-weighted), "median", "min" or "max"; interp: "linear" or "nearest" (-nointerp).
    Returns:
        (A,) one value per streamline, in the image's dtype (0 for a streamline of one vertex's mean); the
        mean, min and max are differentiable in the vertices and the image. A float32 image is sampled and
        averaged in float32 with tcksample's summation order (its values to rounding); float64 is exact.
    """
    image = _check(stat, interp, image)
    P = packed(tracks)
    A = P.lengths.numel()
    verts = P.vertices.to(image.dtype) if image.is_floating_point() else P.vertices
    vals = vertex_values(verts, image if image.is_floating_point() else image.double(), affine, interp)
    sid = streamline_ids(P.lengths)
    if stat == "mean" and vals.dtype == torch.float32:
        return _sequential_mean32(vals, vertex_lengths(verts, P.lengths), P.lengths)
    if stat == "mean":
        return _segment_mean(vals, vertex_lengths(verts, P.lengths).to(vals.dtype), sid, A)
    if stat in ("min", "max"):
        init = torch.full((A,), float("inf") if stat == "min" else float("-inf"), dtype=vals.dtype, device=vals.device)
        return init.scatter_reduce(0, sid, vals, "amin" if stat == "min" else "amax", include_self=False)
    return _segment_median(vals, P.lengths, sid)


def sample_vertices(tracks, image, affine, interp: str = "linear") -> Tensor:
    """tcksample without -stat_tck: the image's value at every vertex, (V,) in the image's dtype, packed as the
    vertices (split by ``lengths`` for per-streamline profiles); differentiable in the vertices and the image."""
    image = _check("mean", interp, image)
    P = packed(tracks)
    verts = P.vertices.to(image.dtype) if image.is_floating_point() else P.vertices
    return vertex_values(verts, image if image.is_floating_point() else image.double(), affine, interp)


def _sequential_mean32(vals: Tensor, seg_len: Tensor, lengths: Tensor) -> Tensor:
    """tcksample's float32 mean: integral and total length summed vertex by vertex in float32."""
    w = seg_len.to(torch.float32)
    integral, total = sequential_sum32(vals.to(torch.float32) * w, lengths), sequential_sum32(w, lengths)
    ok = total > 0
    return torch.where(ok, integral / torch.where(ok, total, torch.ones_like(total)), torch.zeros_like(total))


def _segment_median(vals: Tensor, lengths: Tensor, sid: Tensor) -> Tensor:
    """Median of each streamline's values (NaN values dropped, as MRtrix3's Math::median), (A,)."""
    A = lengths.numel()
    ok = ~torch.isnan(vals)
    n = torch.zeros(A, dtype=torch.long, device=vals.device).index_add(0, sid, ok.long())
    L = int(lengths.max()) if A else 0
    _, pos = padded_index(lengths)
    grid = torch.full((A, max(L, 1)), float("inf"), dtype=vals.dtype, device=vals.device)
    grid = grid.index_put((sid, pos), torch.where(ok, vals, torch.full_like(vals, float("inf"))))
    srt = grid.sort(dim=1).values
    lo = srt.gather(1, ((n - 1) // 2).clamp(min=0)[:, None])[:, 0]
    hi = srt.gather(1, (n // 2).clamp(max=max(L - 1, 0))[:, None])[:, 0]
    med = torch.where(n % 2 == 1, hi, (lo + hi) / 2)
    return torch.where(n > 0, med, torch.full_like(med, float("nan")))


def soft_stat(tracks, image, affine, stat: str = "mean", temperature: float = 0.01,
              interp: str = "linear") -> Tensor:
    """Differentiable relaxation of :func:`sample_stat` (same arguments). "mean": the length-weighted mean with
    each vertex also weighted by its survival weight (a :class:`tractfunc.Tracks` from soft stopping);
    "min"/"max": ``-/+ temperature * log(mean_i exp(-/+ v_i / temperature))`` over the vertices (-> min / max as
    temperature -> 0); "median" has no relaxation here. -> (A,) in the image's dtype; works under torch.func."""
    image = _check(stat, interp, image)
    if stat == "median":
        raise TractfuncError("soft_stat: the median has no soft form; use mean, min or max")
    if not temperature > 0:
        raise TractfuncError(f"temperature {temperature}: expected a positive value")
    P = packed(tracks)
    A = P.lengths.numel()
    verts = P.vertices.to(image.dtype)
    vals = vertex_values(verts, image, affine, interp)
    sid = streamline_ids(P.lengths)
    s = P.vertex_weights.to(vals.dtype) if P.vertex_weights is not None else torch.ones_like(vals)
    if stat == "mean":
        return _segment_mean(vals, vertex_lengths(verts, P.lengths).to(vals.dtype) * s, sid, A)
    sign = -1.0 if stat == "min" else 1.0
    z = sign * vals / temperature
    zmax = torch.full((A,), float("-inf"), dtype=z.dtype, device=z.device).scatter_reduce(
        0, sid, z.detach(), "amax", include_self=False)
    e = torch.exp(z - zmax[sid])
    tot = torch.zeros(A, dtype=z.dtype, device=z.device).index_add(0, sid, e)
    n = torch.zeros(A, dtype=z.dtype, device=z.device).index_add(0, sid, torch.ones_like(e))
    return sign * temperature * (zmax + torch.log(tot / n))

