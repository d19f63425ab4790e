"""Real spherical harmonics in the MRtrix3 convention, with derivatives on the sphere.

Convention (identical to DIPY ``tournier07`` with ``legacy=False``): even degrees ``l = 0, 2, ..., lmax``,
orthonormal, Condon-Shortley phase, coefficient index ``l(l+1)/2 + m`` for ``-l <= m <= l``;
``m > 0`` uses ``sqrt(2) N_lm P_l^m(cos el) cos(m az)``, ``m < 0`` uses ``sin(|m| az)``.

Directions are unit 3-vectors ``(..., 3)`` in the scanner (RAS) frame, as MRtrix3 stores FODs.

Two evaluators live here:

* :func:`sh_jet` -- the exact, pole-safe one.  Every basis function is written as a polynomial in the
  Cartesian components ``(x, y, z)``: ``Y_lm = c_lm * d^m P_l(z)/dz^m * Re/Im (x + i y)^|m|``.  Value,
  gradient and Hessian of that polynomial are closed-form (``d/dz d^m P_l = d^{m+1} P_l``), so the
  Riemannian gradient and Hessian on the sphere (tangent-plane parameterisation) are finite and smooth
  everywhere, including on the z axis.
* :class:`LegendreTable` -- an emulation of MRtrix3's ``PrecomputedAL`` (512 elevations, linear
  interpolation, ``(el, az)`` derivative formulas), used only when bit-level agreement with
  ``tckgen`` (``sh_precomputed: 1``) is wanted.  Within ``1e-3`` rad of the z axis it defers to
  :func:`sh_jet`, where the ``(el, az)`` form is ill-conditioned.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

from .shsize import lmax_for, n_coeffs  # noqa: F401  (re-exported: part of this module's API)
from .arrays import as_tensor
from .tracing import is_tracing

Tensor = torch.Tensor


@lru_cache(maxsize=None)
def _tables(lmax: int):
    """Index maps for coefficient k: degree l, order |m|, whether it is the sin (m<0) part, and
    the normalisation c_lm (float64 numpy), so that Y_k = c_k * Q_{l,|m|}(z) * T_k(x, y)."""
    ls, ms, neg, c = [], [], [], []
    for l in range(0, lmax + 1, 2):
        for m in range(-l, l + 1):
            am = abs(m)
            norm = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - am) / math.factorial(l + am))
            if am:
                norm *= math.sqrt(2.0) * (-1.0) ** am  # Condon-Shortley phase
            ls.append(l)
            ms.append(am)
            neg.append(m < 0)
            c.append(norm)
    return (np.array(ls), np.array(ms), np.array(neg), np.array(c))


def _legendre_derivatives(z: Tensor, lmax: int, extra: int) -> Tensor:
    """``Q[..., l, m] = d^m P_l / dz^m (z)`` for ``l <= lmax``, ``m <= lmax + extra`` (zero for m > l).

    Uses Bonnet's recurrence for ``m = 0`` and ``Q_{l+1,m} = Q_{l-1,m} + (2l+1) Q_{l,m-1}``.
    z: (...,) -> (..., lmax+1, lmax+1+extra)."""
    ncol = lmax + 1 + extra
    zero = torch.zeros_like(z)
    one = torch.ones_like(z)
    rows = [torch.stack([one] + [zero] * (ncol - 1), -1)]
    if lmax >= 1:
        rows.append(torch.stack([z, one] + [zero] * (ncol - 2), -1))
    for l in range(1, lmax):
        prev, cur = rows[l - 1], rows[l]
        p0 = ((2 * l + 1) * z * cur[..., 0] - l * prev[..., 0]) / (l + 1)
        rest = prev[..., 1:] + (2 * l + 1) * cur[..., :-1]
        rows.append(torch.cat([p0.unsqueeze(-1), rest], -1))
    return torch.stack(rows, -2)


def _trig_powers(x: Tensor, y: Tensor, mmax: int) -> tuple[Tensor, Tensor]:
    """``C_m = Re (x+iy)^m``, ``S_m = Im (x+iy)^m`` for ``m = 0..mmax``: each (..., mmax+1)."""
    c = [torch.ones_like(x)]
    s = [torch.zeros_like(x)]
    for _ in range(mmax):
        c_prev, s_prev = c[-1], s[-1]
        c.append(c_prev * x - s_prev * y)
        s.append(s_prev * x + c_prev * y)
    return torch.stack(c, -1), torch.stack(s, -1)


@lru_cache(maxsize=None)
def _index_tensors(lmax: int, device, dtype):
    ls, ms, neg, c = _tables(lmax)
    dev = dict(device=device)
    return (torch.as_tensor(ls, **dev), torch.as_tensor(ms, **dev), torch.as_tensor(neg, **dev),
            torch.as_tensor(c, dtype=dtype, **dev))


def basis(dirs: Tensor, lmax: int) -> Tensor:
    """SH basis values at unit directions.

    dirs: (..., 3) unit vectors (scanner frame).  Returns (..., n_coeffs(lmax)), dtype/device of ``dirs``.
    """
    return _jet(as_tensor(dirs), lmax, order=0)[0]


def amplitude(coeffs: Tensor, dirs: Tensor) -> Tensor:
    """FOD amplitude ``sum_k c_k Y_k(u)``.  coeffs: (..., N); dirs: (..., 3) unit -> (...,)."""
    coeffs = as_tensor(coeffs)
    return (basis(dirs, lmax_for(coeffs.shape[-1])) * coeffs).sum(-1)


def _jet(dirs: Tensor, lmax: int, order: int):
    """Basis values and Cartesian derivatives of the polynomial extension.

    Returns (B (..., N), dB (..., N, 3) or None, d2B (..., N, 3, 3) or None)."""
    x, y, z = dirs.unbind(-1)
    ls, ms, neg, c = _index_tensors(lmax, dirs.device, dirs.dtype)
    Q = _legendre_derivatives(z, lmax, extra=order)            # (..., L+1, L+1+order)
    C, S = _trig_powers(x, y, lmax)                            # (..., L+1)
    q = [Q[..., ls, ms + j] * c for j in range(order + 1)]      # d^j/dz^j of the z-factor, (..., N)

    def trig(shift: int, rot: int):
        # rot = 0: T itself (C or S); rot = 1: the "rotated" partner (-S for C, C for S)
        idx = (ms - shift).clamp(min=0)
        Cs, Ss = C[..., idx], S[..., idx]
        if rot == 0:
            return torch.where(neg, Ss, Cs)
        return torch.where(neg, Cs, -Ss)

    T = trig(0, 0)
    B = q[0] * T
    if order == 0:
        return B, None, None
    mf = ms.to(dirs.dtype)
    Tx = mf * trig(1, 0)          # d/dx T_m = m T_{m-1}
    Ty = mf * trig(1, 1)          # d/dy C_m = -m S_{m-1}; d/dy S_m = m C_{m-1}
    dB = torch.stack([q[0] * Tx, q[0] * Ty, q[1] * T], -1)
    if order == 1:
        return B, dB, None
    mm = mf * (mf - 1)
    Txx = mm * trig(2, 0)
    Txy = mm * trig(2, 1)
    Tyy = -Txx
    row0 = torch.stack([q[0] * Txx, q[0] * Txy, q[1] * Tx], -1)
    row1 = torch.stack([q[0] * Txy, q[0] * Tyy, q[1] * Ty], -1)
    row2 = torch.stack([q[1] * Tx, q[1] * Ty, q[2] * T], -1)
    return B, dB, torch.stack([row0, row1, row2], -2)


class SphereJet(NamedTuple):
    """Amplitude and its Riemannian derivatives on the unit sphere at ``u``.

    amp: (...,); grad: (..., 3) tangent gradient (orthogonal to u); hess: (..., 3, 3) tangent Hessian
    (symmetric, maps the tangent plane to itself, zero along u)."""
    amp: Tensor
    grad: Tensor
    hess: Tensor


def _contract(coeffs: Tensor, dB: Tensor, d2B: Tensor):
    """sum_k c_k dB_k (..., 3) and sum_k c_k d2B_k (..., 3, 3) as one ``bmm`` each: the kernel einsum reduces
    these contractions to, whatever the batch shape (so the sums are einsum's, bit for bit), without einsum's
    per-call planning (a sizeable share of a tracking step)."""
    lead = torch.broadcast_shapes(coeffs.shape[:-1], dB.shape[:-2])
    n = coeffs.shape[-1]
    c = coeffs.expand(*lead, n).reshape(-1, 1, n)
    g = torch.bmm(c, dB.expand(*lead, n, 3).reshape(-1, n, 3)).reshape(*lead, 3)
    H = torch.bmm(c, d2B.expand(*lead, n, 3, 3).reshape(-1, n, 9)).reshape(*lead, 3, 3)
    return g, H


def sh_jet(coeffs: Tensor, u: Tensor) -> SphereJet:
    """Exact, pole-safe amplitude, tangent gradient and tangent Hessian of an SH series at ``u``.

    coeffs: (..., N) SH coefficients; u: (..., 3) unit directions (scanner frame).
    With F the polynomial extension, grad = P dF and hess = P d2F P - (u . dF) P, P = I - u u^T."""
    coeffs, u = as_tensor(coeffs), as_tensor(u)
    B, dB, d2B = _jet(u, lmax_for(coeffs.shape[-1]), order=2)
    amp = (B * coeffs).sum(-1)
    g, H = _contract(coeffs, dB, d2B)
    eye = torch.eye(3, dtype=u.dtype, device=u.device)
    P = eye - u.unsqueeze(-1) * u.unsqueeze(-2)
    radial = (u * g).sum(-1)
    grad = (P @ g.unsqueeze(-1)).squeeze(-1)
    hess = P @ H @ P - radial[..., None, None] * P
    return SphereJet(amp, grad, hess)


# --------------------------------------------------------------------------------------------------
# MRtrix3 PrecomputedAL emulation (lookup table of normalised associated Legendre functions).


def _plm_float32(lmax: int, x: np.ndarray) -> np.ndarray:
    """Orthonormal associated Legendre ``N_lm P_l^m(x)`` with Condon-Shortley phase, evaluated in single
    precision with the same recurrence MRtrix3 uses for its table, so the rounding matches.

    x: (n,) float32 cosines -> (n, lmax+1, lmax+1) float32 indexed [n, l, m] (zero for m > l)."""
    f = np.float32
    x = x.astype(f)
    x2 = x * x
    out = np.zeros((x.shape[0], lmax + 1, lmax + 1), dtype=f)

    def sin_power(y, m):   # prod over k of y (k-1)/k for k = m, m-2, ..., 2 (float32, left to right)
        return np.ones_like(y) if m < 1 else ((y * f(m - 1)) / f(m)) * sin_power(y, m - 2)

    for m in range(lmax + 1):
        v0 = np.full_like(x, f(0.282094791773878))
        if m:
            v0 = v0 * np.sqrt(f(2 * m + 1) * sin_power(f(1) - x2, 2 * m))
            v0 = np.where(x2 >= 1, f(0), v0)
        if m & 1:
            v0 = -v0
        out[:, m, m] = v0
        if m == lmax:
            continue
        g = np.sqrt(f(2 * m + 3))
        out[:, m + 1, m] = (x * g) * v0
        for n in range(m + 2, lmax + 1):
            v = x * out[:, n - 1, m] - out[:, n - 2, m] / g
            g = np.sqrt(f(4 * n * n - 1) / f(n * n - m * m))
            out[:, n, m] = v * g
    return out


class LegendreTable:
    """Lookup table of ``N_lm P_l^m(cos el)`` at 512 evenly spaced elevations in [0, pi], linearly
    interpolated, emulating MRtrix3's ``Math::SH::PrecomputedAL`` (used by ``tckgen`` SD_Stream when
    ``sh_precomputed`` is set, its default)."""

    ndir = 512

    def __init__(self, lmax: int, device=None, dtype=torch.float32):
        self.lmax = lmax
        inc = np.float32(math.pi / (self.ndir - 1))
        el = np.arange(self.ndir, dtype=np.float32) * inc
        # single precision throughout, as the table tckgen builds (float64 runs use the same values)
        tab = _plm_float32(lmax, np.cos(el))
        self.table = torch.as_tensor(tab, dtype=dtype, device=device)   # (512, L+1, L+1)
        self.inc = torch.tensor(inc, dtype=dtype, device=device)

    def to(self, device=None, dtype=None) -> "LegendreTable":
        new = object.__new__(LegendreTable)
        new.lmax = self.lmax
        new.table = self.table.to(device=device, dtype=dtype)
        new.inc = self.inc.to(device=device, dtype=dtype)
        return new

    def lookup(self, el: Tensor) -> Tensor:
        """Interpolated AL table at elevations el: (...,) radians -> (..., L+1, L+1)."""
        t = el / self.inc
        i = t.floor().clamp(0, self.ndir - 2)
        f2 = (t - i).clamp(0, 1)
        ii = i.long()
        p1, p2 = self.table[ii], self.table[ii + 1]
        f2 = f2[..., None, None]
        return (1 - f2) * p1 + f2 * p2


class LineJet(NamedTuple):
    """What one Newton step on the sphere needs at ``u``.

    amp: (...,) amplitude; gdir: (..., 3) unit tangent direction of steepest ascent (zero where the
    gradient vanishes); slope: (...,) derivative along gdir (= |grad|); curv: (...,) second derivative
    along gdir."""
    amp: Tensor
    gdir: Tensor
    slope: Tensor
    curv: Tensor


def _safe_unit(v: Tensor, n: Tensor) -> Tensor:
    ok = n > 0
    return torch.where(ok.unsqueeze(-1), v / torch.where(ok, n, torch.ones_like(n)).unsqueeze(-1),
                       torch.zeros_like(v))


def exact_line_jet(coeffs: Tensor, u: Tensor) -> LineJet:
    """Line jet from the exact tangent-plane derivatives (:func:`sh_jet`); finite everywhere."""
    j = sh_jet(coeffs, u)
    gn = torch.linalg.vector_norm(j.grad, dim=-1)
    gdir = _safe_unit(j.grad, gn)
    curv = torch.einsum("...i,...ij,...j->...", gdir, j.hess, gdir)
    return LineJet(j.amp, gdir, gn, curv)


def mrtrix_line_jet(coeffs: Tensor, u: Tensor, table: LegendreTable) -> LineJet:
    """Line jet as MRtrix3 3.0.3 ``get_peak`` computes it: AL values from the lookup table and
    (el, az) partial derivatives (without the connection terms of the covariant Hessian).

    Within 1e-3 rad of the z axis, where that form is ill-conditioned, the exact jet is returned.
    coeffs: (..., N); u: (..., 3) unit."""
    lmax = table.lmax
    l_idx, m_idx, use, s_lo, s_hi, s_lo2, d2_mid, s_hi2, base = _mrtrix_consts(lmax, u.device, u.dtype)
    zonal = m_idx == 0
    az = torch.atan2(u[..., 1], u[..., 0])
    el = torch.acos(u[..., 2].clamp(-1, 1))
    sel, cel = torch.sin(el), torch.cos(el)
    ALp = torch.nn.functional.pad(table.lookup(el), (2, 2))       # [..., l, m+2]
    # one gather for the five m-shifts (0, -1, +1, -2, +2) of every coefficient
    n_m = ALp.shape[-1]
    shifts = torch.tensor([0, -1, 1, -2, 2], device=u.device)
    flat_idx = (l_idx * n_m + m_idx + 2).unsqueeze(0) + shifts.unsqueeze(1)       # (5, N)
    al5 = ALp.reshape(*ALp.shape[:-2], -1)[..., flat_idx.reshape(-1)].reshape(*ALp.shape[:-2], 5, -1)
    a0, am1, ap1, am2, ap2 = al5.unbind(-2)
    mf = m_idx.to(u.dtype)
    maz = mf * az.unsqueeze(-1)
    caz, saz = math.sqrt(2.0) * torch.cos(maz), math.sqrt(2.0) * torch.sin(maz)
    vp, vm = coeffs[..., base + m_idx], coeffs[..., base - m_idx]
    w = vp * caz + vm * saz
    wr = vm * caz - vp * saz
    zero = torch.zeros_like(w)

    zf, uf = zonal.to(u.dtype), use.to(u.dtype)   # disjoint 0/1 masks: m == 0, cosine half of an m pair

    def total(zonal_term, pair_term):
        """Sum over coefficients of the zonal term where m == 0 and the pair term on cosine entries."""
        if zonal_term is zero:
            return (pair_term * uf).sum(-1)
        return (zonal_term * zf + pair_term * uf).sum(-1)

    tmp = -(s_lo * am1 - s_hi * ap1) / 2.0
    tmp2 = d2_mid * a0 + torch.where(m_idx == 1, -s_lo2 * a0, s_lo2 * am2) + s_hi2 * ap2
    amp = total(coeffs * a0, w * a0)
    d_el = total(coeffs * s_lo * ap1, w * tmp)
    d2_el = total(coeffs * (s_lo2 * ap2 + d2_mid * a0), w * tmp2)
    atpole = sel < 1e-4
    safe = torch.where(atpole, torch.ones_like(sel), sel)
    d_az = torch.where(atpole, total(zero, wr * tmp), total(zero, mf * wr * a0) / safe)
    d_elaz = torch.where(atpole, torch.zeros_like(sel), total(zero, mf * wr * tmp) / safe)
    d_az2 = torch.where(atpole, torch.zeros_like(sel), total(zero, -w * mf * mf * a0) / (safe * safe))

    gn = torch.sqrt(d_el * d_el + d_az * d_az)
    ok = gn != 0
    gsafe = torch.where(ok, gn, torch.ones_like(gn))
    h_el = torch.where(ok, d_el / gsafe, torch.zeros_like(gn))
    h_az = torch.where(ok, d_az / gsafe, torch.zeros_like(gn))
    slope = h_az * d_az + h_el * d_el
    curv = h_az * h_az * d_az2 + 2.0 * h_az * h_el * d_elaz + h_el * h_el * d2_el
    ca, sa = torch.cos(az), torch.sin(az)
    gdir = torch.stack([h_el * ca * cel - h_az * sa, h_el * sa * cel + h_az * ca, -h_el * sel], -1)
    near = sel < 1e-3
    out = LineJet(amp, gdir, slope, curv)
    if is_tracing(coeffs, u):
        ex = exact_line_jet(coeffs, u)
        return LineJet(*(torch.where(near.reshape(near.shape + (1,) * (a.dim() - near.dim())), e, a)
                         for e, a in zip(ex, out)))
    if not bool(near.any()):
        return out
    # eager: evaluate the exact jet only where needed
    shape = near.shape
    c = coeffs.expand(*shape, coeffs.shape[-1]).reshape(-1, coeffs.shape[-1])
    idx = torch.nonzero(near.reshape(-1)).squeeze(1)
    ex = exact_line_jet(c[idx], u.reshape(-1, 3)[idx])
    return LineJet(*(a.reshape(-1, *a.shape[len(shape):]).index_put((idx,), e).reshape(a.shape)
                     for e, a in zip(ex, out)))


@lru_cache(maxsize=None)
def _mrtrix_consts(lmax: int, device, dtype):
    k = torch.as_tensor(_mrtrix_deriv_consts(lmax), dtype=dtype, device=device)
    l_idx, m_idx = k[:, 0].long(), k[:, 1].long()
    return (l_idx, m_idx, k[:, 2].bool(), k[:, 3], k[:, 4], k[:, 5], k[:, 6], k[:, 7], (l_idx * (l_idx + 1)) // 2)


@lru_cache(maxsize=None)
def _mrtrix_deriv_consts(lmax: int):
    """Per-coefficient constants of the (el, az) derivative formulas (float64 numpy, one row per
    coefficient): l, |m|, is-cos-part-of-a-pair, and the ladder factors."""
    rows = []
    for l in range(0, lmax + 1, 2):
        for m in range(-l, l + 1):
            am = abs(m)
            if am == 0:
                rows.append((l, 0, 0, math.sqrt(l * (l + 1)), 0.0,
                             math.sqrt(l * (l + 1) * (l - 1) * (l + 2)) / 2.0, -l * (l + 1) / 2.0, 0.0))
                continue
            s_lo = math.sqrt((l + am) * (l - am + 1))
            s_hi = math.sqrt((l - am) * (l + am + 1)) if l > am else 0.0
            d2_mid = -((l + am) * (l - am + 1) + (l - am) * (l + am + 1)) / 4.0
            s_lo2 = math.sqrt((l + am) * (l - am + 1) * (l + am - 1) * (l - am + 2)) / 4.0
            s_hi2 = math.sqrt((l - am) * (l + am + 1) * (l - am - 1) * (l + am + 2)) / 4.0 if l > am + 1 else 0.0
            rows.append((l, am, 1 if m > 0 else 0, s_lo, s_hi, s_lo2, d2_mid, s_hi2))
    return np.array(rows, dtype=np.float64)
