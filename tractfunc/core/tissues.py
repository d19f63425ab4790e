"""Five-tissue-type (5TT) sampling in PyTorch: tckgen's tissue classes and its crop at the GM-WM interface.

Frames: positions (..., 3) are scanner mm; the 5TT image is sampled on its own grid (:class:`ACTField`).  Volumes
of the 5TT image: cortical GM, sub-cortical GM, WM, CSF, pathological tissue (partial-volume fractions).

The native kernel (``tractfunc/sdstream/csrc/sd_stream.c``) applies the same rules in tckgen's float32 arithmetic;
these functions evaluate them in the inputs' dtype, differentiably where the rule is a value (the cropped vertex is
a Hermite spline point of the streamline's last vertices: its derivative flows to them, the bisection's choices
are held fixed).
"""
from __future__ import annotations

from typing import Optional

import torch

from .field import ACTField
from .interpolate import nearest_value, to_voxel, trilinear

Tensor = torch.Tensor

CGM, SGM, WM, CSF, PATH = range(5)
GMWMI_ACCURACY = 0.01        # |GM - WM| below this counts as on the interface (tckgen)
GMWMI_MAX_ITERS = 10         # bisections on the Hermite curve (tckgen)
HERMITE_TENSION = 0.1


def sample_tissues(act: ACTField, pos: Tensor, masked: bool = False) -> tuple:
    """Tissue fractions at ``pos`` (..., 3) scanner mm, by trilinear interpolation (MRtrix3's linear interpolator,
    in ``act.tissues``' dtype; ``masked``: a point whose nearest voxel is all zero counts as outside, as the ACT
    tracking rules sample).

    Returns (t (..., 5) clamped to [0, 1], zeros outside the image or on a NaN; inside (...,) bool)."""
    vox = to_voxel(pos, act.world_to_voxel.to(torch.float64))
    s = trilinear(act.tissues, vox)
    if masked:
        s = s._replace(inside=s.inside & nearest_value((act.tissues != 0).any(-1), vox))
    t = torch.nan_to_num(s.values.clamp(0.0, 1.0), nan=0.0)
    bad = torch.isnan(s.values).any(-1, keepdim=True) | ~s.inside.unsqueeze(-1)
    return torch.where(bad, torch.zeros_like(t), t), s.inside


def gm_minus_wm(t: Tensor) -> Tensor:
    """(..., 5) tissues -> (...,) GM (cortical + sub-cortical) minus WM."""
    return (t[..., CGM] + t[..., SGM]) - t[..., WM]


def hermite_weights(mu: Tensor, tension: float = HERMITE_TENSION) -> Tensor:
    """Cardinal spline weights (..., 4) at ``mu`` (...,) in [0, 1] (MRtrix3's ``Math::Hermite``): the curve through
    the middle two of four points, from the second (mu = 0) to the third (mu = 1)."""
    t = 0.5 * tension
    p2, p3 = mu * mu, mu * mu * mu
    return torch.stack([(0.5 - t) * ((2.0 * p2 - p3) - mu), (1.0 + (1.5 + t) * p3) - (2.5 + t) * p2,
                        ((2.0 + 2.0 * t) * p2 + (0.5 - t) * mu) - (1.5 + t) * p3, (0.5 - t) * (p3 - p2)], -1)


def crop_at_interface(act: ACTField, last3: Tensor, todo: Optional[Tensor] = None) -> Tensor:
    """tckgen's ``-crop_at_gmwmi`` for streamline ends: the point where GM - WM crosses 0 on the Hermite curve
    through each end's last three vertices and their extrapolation (10 bisections), or the end vertex itself where
    its last two vertices do not straddle the interface, either is outside the 5TT image, or the end is already
    within 0.01 of it.

    Args:
        act: the 5TT image.
        last3: (E, 3, 3) per end, its vertices [end, previous, the one before] in scanner mm.
        todo: (E,) bool, which ends to crop, when decided elsewhere (the native kernel: an end next to a seed on
            the interface straddles it or not at rounding level); None decides here.
    Returns:
        (E, 3) the new end vertices, differentiable wrt ``last3`` (the bisection's choices are held fixed)."""
    pe, pp, pq = last3[:, 0], last3[:, 1], last3[:, 2]
    with torch.no_grad():
        (te, ie), (tp, ip) = sample_tissues(act, pe), sample_tissues(act, pp)
        de, dp = gm_minus_wm(te), gm_minus_wm(tp)
        if todo is None:
            todo = ie & ip & (((de > 0) & (dp < 0)) | ((de < 0) & (dp > 0))) & (de >= GMWMI_ACCURACY)
    curv = (pe - pp) - (pp - pq)
    dom = torch.stack([pq, pp, pe, pe + ((pe - pp) + curv)], 1)                       # (E, 4, 3)
    with torch.no_grad():
        lo, hi = torch.zeros_like(de), torch.ones_like(de)
        best = torch.full_like(de, -1.0)                                                 # -1: keep the end
        done = ~todo
        for _ in range(GMWMI_MAX_ITERS):
            mu = 0.5 * (lo + hi)
            p = (hermite_weights(mu).to(dom.dtype).unsqueeze(-1) * dom).sum(1)
            d = gm_minus_wm(sample_tissues(act, p)[0])
            wm_side = (-d > 0) & ~done
            gm_side = ~wm_side & ~done
            lo = torch.where(wm_side, mu, lo)
            hi = torch.where(gm_side, mu, hi)
            best = torch.where(gm_side, mu, best)
            done = done | (gm_side & (d < GMWMI_ACCURACY))
    w = hermite_weights(best.clamp(min=0.0)).to(dom.dtype)
    crop = (w.unsqueeze(-1) * dom).sum(1)
    return torch.where((best >= 0).unsqueeze(-1), crop, pe)


def class_margins(t: Tensor) -> tuple:
    """tckgen's tissue classes as signed margins (positive inside the class), from tissues (..., 5):
    (m_csf, m_gm) = (CSF - max(cGM, sGM, WM, pathology), GM - max(WM, CSF, pathology)) with GM = cGM + sGM.
    ``m_csf >= 0`` is tckgen's ``is_csf``; ``m_gm >= 0`` its ``is_gm`` (up to the tie rules, measure zero)."""
    gm = t[..., CGM] + t[..., SGM]
    others = torch.stack([t[..., CGM], t[..., SGM], t[..., WM], t[..., PATH]], -1).amax(-1)
    m_csf = t[..., CSF] - others
    m_gm = gm - torch.stack([t[..., WM], t[..., CSF], t[..., PATH]], -1).amax(-1)
    return m_csf, m_gm
