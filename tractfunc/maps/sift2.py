"""SIFT2 streamline weights: ``tcksift2`` (hard) and a differentiable fit with implicit gradients (soft).

Model (MRtrix3 3.0.3 ``SIFT::ModelBase``, ``SIFT2::TckFactor``, read for understanding): fixels j with FOD integral
F_j and processing-mask weight PM_j (:mod:`tractfunc.maps.fixels`), streamline s with lengths L_sj in fixel j
(8-bit storage) and a coefficient x_s (weight e^{x_s}). The proportionality coefficient
mu = sum_j PM_j F_j / sum_s c_s, with c_s = sum_j PM_j L_sj the streamline's (unquantised) weighted length, is
fixed by the initial mapping. Fixel j's track density is TD_j = sum_s L_sj e^{x_s}; the data cost is
sum_j PM_j (mu TD_j - F_j)^2.

tcksift2's solver (the hard form, :func:`sift2`): fixels with mu TD_j < min_td_frac F_j are
excluded from the optimisation (they stay in the cost). Each iteration updates every streamline at once (all
read the same fixel state): for streamline s, over its non-excluded fixels, with TD'_j = TD_j - L_sj e^{x_s} and
dTD_j = (TD0_j - L_sj) e^{x_s} (the other streamlines of the fixel assumed to move with it),

  f_s(t) = sum_j (L_sj / TD0_j) PM_j (mu (TD'_j + L_sj e^{x_s + t} + dTD_j t) - F_j)^2
           + lambda_tik A (x_s + t)^2 + (lambda_tv A / c_s) sum_j PM_j L_sj tv(x_s + t, m_j),

tv(x, m) = (x - m)^2 for x <= m, (e^x - e^m)^2 above; m_j the length-weighted mean coefficient of fixel j
(0 with fewer than two streamlines), A = sum_j PM_j F_j^2 / (number of streamlines). Newton steps on t
(reversed where the curvature is negative, capped at +-max_coeff_step, until below 1e-3, at most 100); then TD,
m and the cost are recomputed; stop when an iteration lowers the total cost by less than min_cf_decrease x the
initial cost (after min_iters), or at max_iters. Defaults: reg_tikhonov 0, reg_tv 0.1, min_td_frac 0.1,
min_iters 10, max_iters 1000, min/max coefficient -inf / +inf, max_coeff_step 1, min_cf_decrease 2.5e-5.

Soft form (:func:`soft_sift2`): x* = argmin E(x; F, L) of a smooth version of the same cost (data + Tikhonov +
the quadratic TV branch, fixel means as functions of x), solved by Newton-CG; its gradient wrt F and L comes
from the implicit function theorem (``proofs/sift2_implicit.md``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from ..errors import TractfuncError
from .fixels import Contributions, Fixels, map_streamlines, segment

Tensor = torch.Tensor

REG_TIKHONOV = 0.0
REG_TV = 0.1
MIN_TD_FRAC = 0.10
MIN_ITERS = 10
MAX_ITERS = 1000
MAX_COEFF_STEP = 1.0
MIN_CF_DECREASE = 2.5e-5


class DEFAULTS:
    """tcksift2's defaults (the CLI's option defaults)."""
    REG_TIKHONOV, REG_TV, MIN_TD_FRAC, MIN_ITERS, MAX_ITERS = REG_TIKHONOV, REG_TV, MIN_TD_FRAC, MIN_ITERS, MAX_ITERS
    MAX_COEFF_STEP, MIN_CF_DECREASE = MAX_COEFF_STEP, MIN_CF_DECREASE


class Sift2Result(NamedTuple):
    """weights: (A,) e^x (0 for coefficients at min_coeff); coeffs: (A,) x; mu: proportionality coefficient;
    cost: (iterations + 1,) total cost per iteration (data + regularisation), cost[0] the initial data cost;
    fixel_td: (J,) final track density per fixel (sum_s L_sj w_s); excluded: (J,) bool."""
    weights: Tensor
    coeffs: Tensor
    mu: float
    cost: Tensor
    fixel_td: Tensor
    excluded: Tensor


class Problem(NamedTuple):
    """The SIFT2 problem in arrays. sid, fix, L: (P,) contributions; F, PM: (J,) fixel integrals and mask
    weights; c: (A,) per-streamline weighted length (float32 as tcksift2 keeps it); mu: float."""
    sid: Tensor
    fix: Tensor
    L: Tensor
    F: Tensor
    PM: Tensor
    c: Tensor
    mu: float


def problem(fx: Fixels, con: Contributions) -> Problem:
    """Assemble the SIFT2 arrays from fixels and the streamline -> fixel mapping (mu as tcksift2 computes it)."""
    F, PM = fx.integral.double(), fx.weight.double()
    fod_sum = float((F * PM).sum())
    td_sum = float(con.total_contribution.to(torch.float32).double().sum())
    if td_sum <= 0:
        raise TractfuncError("no streamline reaches a fixel; expected streamlines inside the FOD's fixels")
    c = con.total_contribution.to(torch.float32).double()
    return Problem(con.sid, con.fixel, con.length.to(torch.float32).double(), F, PM, c, fod_sum / td_sum)


def _seg_sum(v: Tensor, idx: Tensor, n: int) -> Tensor:
    return torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, idx, v)


def _tv(x, m):
    return torch.where(x <= m, (x - m) ** 2, (torch.exp(x) - torch.exp(m)) ** 2)


def fixel_state(pb: Problem, x: Tensor, td0: Tensor, min_coeff: float):
    """(TD (J,), mean coefficient (J,), count (J,)) for coefficients x (FixelUpdater + normalise_mean_coeff)."""
    J = pb.F.numel()
    f = torch.where(x > min_coeff, torch.exp(x), torch.zeros_like(x))
    td = _seg_sum(pb.L * f[pb.sid], pb.fix, J)
    cnt = _seg_sum(torch.ones_like(pb.L), pb.fix, J)
    mean = _seg_sum(pb.L * x[pb.sid], pb.fix, J)
    mean = torch.where(td0 > 0, mean / torch.where(td0 > 0, td0, torch.ones_like(td0)), mean)
    return td, torch.where(cnt < 2, torch.zeros_like(mean), mean), cnt


def costs(pb: Problem, x: Tensor, td: Tensor, mean: Tensor, reg_tik: float, reg_tv: float):
    """(data cost, Tikhonov cost, TV cost) as tcksift2 logs them (multipliers applied)."""
    data = float((pb.PM * (pb.mu * td - pb.F) ** 2).sum())
    tik = reg_tik * float((x ** 2).sum())
    w = pb.PM[pb.fix] * pb.L / pb.c[pb.sid]
    tv = reg_tv * float((w * _tv(x[pb.sid], mean[pb.fix])).sum())
    return data, tik, tv


def sift2(tracks=None, fod=None, affine=None, *, fixels: Optional[Fixels] = None,
          contributions: Optional[Contributions] = None, proc_mask=None, step_size: Optional[float] = None,
          reg_tikhonov: float = REG_TIKHONOV, reg_tv: float = REG_TV, min_td_frac: float = MIN_TD_FRAC,
          min_iters: int = MIN_ITERS, max_iters: int = MAX_ITERS, min_coeff: float = -np.inf,
          max_coeff: float = np.inf, max_coeff_step: float = MAX_COEFF_STEP,
          min_cf_decrease: float = MIN_CF_DECREASE) -> Sift2Result:
    """tcksift2: per-streamline weights fitting the track density to the fixel FOD integrals.

    Args:
        tracks: Tracks / TrackFile / (vertices (V, 3) scanner mm, lengths (A,)); fod: (X, Y, Z, C) SH image and
            affine (4, 4) (segmented by :func:`tractfunc.maps.fixels.segment`), or ``fixels`` already segmented;
            ``contributions`` an existing mapping (then ``tracks`` may be None).
        proc_mask: (X, Y, Z) processing-mask weights (-proc_mask; default 1 where the FOD is non-zero).
        step_size: the tractogram's step size (mm), for the mapping's upsampling.
        reg_tikhonov, reg_tv, min_td_frac, min_iters, max_iters, min_coeff, max_coeff, max_coeff_step,
        min_cf_decrease: tcksift2's options of the same names (coefficients: x = log(factor)).
    Returns: :class:`Sift2Result` (float64, CPU).
    """
    if fixels is None:
        if fod is None or affine is None:
            raise TractfuncError("sift2 needs a FOD image and its affine, or segmented fixels")
        fixels = segment(fod, affine, proc_mask)
    if contributions is None:
        if tracks is None:
            raise TractfuncError("sift2 needs streamlines or their fixel contributions")
        contributions = map_streamlines(tracks, fixels, step_size=step_size)
    A = contributions.total_length.numel()
    if A == 0:
        raise TractfuncError("empty tractogram: no streamline to weight")
    pb = problem(fixels, contributions)
    return solve(pb, A, reg_tikhonov=reg_tikhonov, reg_tv=reg_tv, min_td_frac=min_td_frac, min_iters=min_iters,
                 max_iters=max_iters, min_coeff=min_coeff, max_coeff=max_coeff, max_coeff_step=max_coeff_step,
                 min_cf_decrease=min_cf_decrease)


def solve(pb: Problem, A: int, *, reg_tikhonov=REG_TIKHONOV, reg_tv=REG_TV, min_td_frac=MIN_TD_FRAC,
          min_iters=MIN_ITERS, max_iters=MAX_ITERS, min_coeff=-np.inf, max_coeff=np.inf,
          max_coeff_step=MAX_COEFF_STEP, min_cf_decrease=MIN_CF_DECREASE) -> Sift2Result:
    """tcksift2's iterations on an assembled :class:`Problem` with A streamlines (see the module docstring)."""
    for name, v in (("reg_tikhonov", reg_tikhonov), ("reg_tv", reg_tv), ("max_coeff_step", max_coeff_step)):
        if not (np.isfinite(v) and v >= 0):
            raise TractfuncError(f"{name} {v}: expected a finite value >= 0")
    if not 0.0 <= min_td_frac <= 1.0:
        raise TractfuncError(f"min_td_frac {min_td_frac}: expected a fraction in [0, 1]")
    J = pb.F.numel()
    mu = pb.mu
    x = torch.zeros(A, dtype=torch.float64)
    td0 = _seg_sum(pb.L, pb.fix, J)
    # tcksift2 also excludes fixels whose "count" is 1; at that point the count is the number of mapping threads
    # that added to the fixel (every thread adds to every fixel), so this never happens when it runs on several
    # threads (and excludes every fixel on one): not repeated here
    excluded = (td0 > 0) & (mu * td0 < min_td_frac * pb.F)
    scale = float((pb.PM * pb.F ** 2).sum()) / A
    reg_tik, reg_tvm = reg_tikhonov * scale, reg_tv * scale
    td, mean = td0.clone(), torch.zeros(J, dtype=torch.float64)
    init_cf = costs(pb, x, td, mean, 0.0, 0.0)[0]
    history = [init_cf]
    prev = new = init_cf
    required = -min_cf_decrease * init_cf
    it = 0
    use = ~excluded[pb.fix]
    sid, fix, L = pb.sid[use], pb.fix[use], pb.L[use]
    while True:
        it += 1
        prev = new
        dx = _line_search(x, sid, fix, L, td, td0, mean, pb.PM, pb.F, mu, pb.c, reg_tik, reg_tvm, max_coeff_step, A)
        dx = dx.clamp(-max_coeff_step, max_coeff_step)
        xn = x + dx
        xn = torch.where(xn < min_coeff, torch.full_like(xn, min_coeff), xn)
        if np.isfinite(max_coeff) and bool((xn > max_coeff).any()):
            xn, newly = _exclude_high(pb, x, xn, td, td0, mean, excluded, mu, max_coeff)
            excluded = excluded | newly
            use = ~excluded[pb.fix]
            sid, fix, L = pb.sid[use], pb.fix[use], pb.L[use]
        x = xn
        td, mean, _ = fixel_state(pb, x, td0, min_coeff)
        d, t1, t2 = costs(pb, x, td, mean, reg_tik, reg_tvm)
        new = d + t1 + t2
        history.append(new)
        if not (((new - prev < required) or it < min_iters) and it < max_iters):
            break
    w = torch.where((x == min_coeff) | ~torch.isfinite(x), torch.zeros_like(x), torch.exp(x))
    return Sift2Result(w, x, mu, torch.tensor(history, dtype=torch.float64), td, excluded)


def _line_search(x, sid, fix, L, td, td0, mean, PM, F, mu, c, reg_tik, reg_tv, max_step, A, tol=1e-3,
                 max_newton=100):
    """Per-streamline Newton iterations of tcksift2's CoefficientOptimiserIterative, all streamlines at once.
    Returns dx (A,)."""
    e = torch.exp(x)[sid]
    tdp = td[fix] - L * e                      # TD without this streamline
    frac = L / td0[fix]
    pm, f_ = PM[fix], F[fix]
    dtd = (td0[fix] - L) * e
    sl = pm * L
    m = mean[fix]
    em = torch.exp(m)
    rtv = reg_tv / c                           # (A,), inf for a streamline of zero contribution
    dx = torch.zeros(A, dtype=torch.float64)
    going = torch.ones(A, dtype=torch.bool)
    for _ in range(max_newton):
        xs = (x + dx)[sid]
        ex = torch.exp(xs)
        cont = L * ex
        sc = mu * cont
        roc = mu * (cont + dtd)
        diff = mu * (tdp + cont + dtd * dx[sid]) - f_
        g = _seg_sum(2.0 * pm * frac * roc * diff, sid, A)
        h = _seg_sum(2.0 * pm * frac * (roc ** 2 + sc * diff), sid, A)
        low = xs <= m
        gtv = torch.where(low, 2.0 * (xs - m), 2.0 * ex * (ex - em))
        htv = torch.where(low, torch.full_like(xs, 2.0), 2.0 * ex * (2.0 * ex - em))
        g = g + reg_tik * 2.0 * (x + dx) + rtv * _seg_sum(sl * gtv, sid, A)
        h = h + reg_tik * 2.0 + rtv * _seg_sum(sl * htv, sid, A)
        ch = torch.where(h != 0, -g / h, torch.zeros_like(g))
        ch = torch.where(h < 0, -ch, ch)
        ch = torch.where(torch.isfinite(ch), ch, torch.zeros_like(ch)).clamp(-max_step, max_step)
        at_hi = (dx >= max_step) & (ch > 0)
        at_lo = (dx <= -max_step) & (ch < 0)
        ch = torch.where(at_hi | at_lo, torch.zeros_like(ch), ch)
        dx = torch.where(going, torch.where(at_hi, torch.full_like(dx, max_step),
                                            torch.where(at_lo, torch.full_like(dx, -max_step), dx + ch)), dx)
        going = going & (ch.abs() > tol)
        if not bool(going.any()):
            break
    return dx


def _exclude_high(pb, x, xn, td, td0, mean, excluded, mu, max_coeff):
    """tcksift2's response to a coefficient above max_coeff: exclude the streamline's fixel with the largest
    share of (over-reconstructed) cost and reset the coefficient to the weighted mean of its other fixels'
    means. Returns (new x, newly excluded (J,) bool)."""
    J = pb.F.numel()
    hi = xn > max_coeff
    sel = hi[pb.sid] & ~excluded[pb.fix] & ((td[pb.fix] * mu - pb.F[pb.fix]) < 0)
    cost = pb.PM[pb.fix] * (td[pb.fix] * mu - pb.F[pb.fix]) ** 2 * pb.L / td0[pb.fix]
    cost = torch.where(sel, cost.float().double(), torch.full_like(cost, -1.0))
    A = x.numel()
    best = torch.full((A,), -1.0, dtype=torch.float64).scatter_reduce(0, pb.sid, cost, "amax")
    is_best = sel & (cost == best[pb.sid]) & (cost > 0)
    newly = torch.zeros(J, dtype=torch.bool)
    newly[pb.fix[is_best]] = True
    drop = torch.zeros(A, dtype=torch.long).index_add_(0, pb.sid, is_best.long()) > 0
    keep = ~excluded[pb.fix] & ~is_best
    wsum = _seg_sum(torch.where(keep, pb.L * pb.PM[pb.fix] * mean[pb.fix], torch.zeros_like(pb.L)), pb.sid, A)
    ws = _seg_sum(torch.where(keep, pb.L * pb.PM[pb.fix], torch.zeros_like(pb.L)), pb.sid, A)
    reset = torch.where(drop & (ws > 0), wsum / torch.where(ws > 0, ws, torch.ones_like(ws)), torch.zeros_like(ws))
    return torch.where(hi, reset, xn), newly


# ----------------------------------------------------------------------------------------------- soft form

def smooth_cost(x: Tensor, F: Tensor, L: Tensor, sid: Tensor, fix: Tensor, PM: Tensor, *, reg_tikhonov: float = REG_TIKHONOV,
                reg_tv: float = REG_TV, mu: Optional[Tensor] = None) -> Tensor:
    """The smooth SIFT2 objective E(x; F, L) (differentiable in x, F, L; any float dtype).

    E = sum_j PM_j (mu TD_j - F_j)^2 + lambda_tik A sum_s x_s^2 + lambda_tv A sum_s (1/c_s) sum_j PM_j L_sj (x_s - m_j)^2
    with TD_j = sum_s L_sj e^{x_s}, c_s = sum_j PM_j L_sj, m_j = sum_s L_sj x_s / sum_s L_sj,
    A = sum_j PM_j F_j^2 / (number of streamlines), mu = sum_j PM_j F_j / sum_s c_s unless given.

    Args: x (A,) coefficients; F (J,) fixel integrals; L, sid, fix (P,) contributions; PM (J,) mask weights.
    Returns: () scalar."""
    n, J = x.shape[0], F.shape[0]
    td = torch.zeros(J, dtype=x.dtype, device=x.device).index_add(0, fix, L * torch.exp(x)[sid])
    c = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, sid, PM[fix] * L)
    if mu is None:
        mu = (PM * F).sum() / c.sum()
    A = (PM * F * F).sum() / n
    data = (PM * (mu * td - F) ** 2).sum()
    td0 = torch.zeros(J, dtype=x.dtype, device=x.device).index_add(0, fix, L)
    m = torch.zeros(J, dtype=x.dtype, device=x.device).index_add(0, fix, L * x[sid])
    m = m / torch.where(td0 > 0, td0, torch.ones_like(td0))
    cs = torch.where(c > 0, c, torch.ones_like(c))
    tv = ((PM[fix] * L / cs[sid]) * (x[sid] - m[fix]) ** 2).sum()
    return data + reg_tikhonov * A * (x * x).sum() + reg_tv * A * tv


def _cg(hvp, b: Tensor, tol: float, max_iter: int) -> Tensor:
    """Conjugate gradients for H v = b with H given as a Hessian-vector product."""
    v = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum()
    b2 = float(rr)
    for _ in range(max_iter):
        if float(rr) <= tol * tol * max(b2, 1e-300):
            break
        Hp = hvp(p)
        alpha = rr / (p * Hp).sum()
        v = v + alpha * p
        r = r - alpha * Hp
        rr_new = (r * r).sum()
        p = r + (rr_new / rr) * p
        rr = rr_new
    return v


def _grad_hvp(x: Tensor, F: Tensor, L: Tensor, args, kw):
    """(gradient of E at x (with graph), Hessian-vector product function)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        g, = torch.autograd.grad(smooth_cost(x, F, L, *args, **kw), x, create_graph=True)
    return x, g, (lambda v: torch.autograd.grad(g, x, v, retain_graph=True)[0])


def minimise(x0: Tensor, F: Tensor, L: Tensor, sid, fix, PM, *, tol: float = 1e-10, max_newton: int = 50,
             cg_tol: float = 1e-10, cg_iter: int = 500, **kw) -> Tensor:
    """x* = argmin E by Newton-CG with backtracking, from x0 (e.g. the hard SIFT2 coefficients). Returns x* (A,)
    detached; the gradient norm at x* is below tol x |gradient at x0| (or max_newton iterations)."""
    F, L = F.detach(), L.detach()
    args = (sid, fix, PM)
    x = x0.detach().clone()
    g0 = None
    for _ in range(max_newton):
        xv, g, hvp = _grad_hvp(x, F, L, args, kw)
        gn = float(torch.linalg.vector_norm(g))
        g0 = gn if g0 is None else g0
        if gn <= tol * max(g0, 1e-300):
            break
        p = _cg(hvp, -g.detach(), cg_tol, cg_iter)
        e0 = float(smooth_cost(x, F, L, *args, **kw))
        slope = float((g.detach() * p).sum())
        if slope >= 0:
            p, slope = -g.detach(), -gn * gn
        t = 1.0
        for _ in range(40):
            if float(smooth_cost(x + t * p, F, L, *args, **kw)) <= e0 + 1e-4 * t * slope:
                break
            t *= 0.5
        x = (x + t * p).detach()
    return x


class _Sift2Fit(torch.autograd.Function):
    """x* (F, L): forward minimises E; backward by the implicit function theorem, H v = dLoss/dx* solved by CG
    with Hessian-vector products, dLoss/d(F, L) = -v^T d(grad_x E)/d(F, L)."""

    @staticmethod
    def forward(ctx, F, L, x0, sid, fix, PM, kw):
        x = minimise(x0, F, L, sid, fix, PM, **kw["solver"], **kw["cost"])
        ctx.save_for_backward(F, L, x, sid, fix, PM)
        ctx.kw = kw
        return x

    @staticmethod
    def backward(ctx, gx):
        F, L, x, sid, fix, PM = ctx.saved_tensors
        kw = ctx.kw
        with torch.enable_grad():
            Fv, Lv = F.detach().requires_grad_(True), L.detach().requires_grad_(True)
            xv = x.detach().requires_grad_(True)
            g, = torch.autograd.grad(smooth_cost(xv, Fv, Lv, sid, fix, PM, **kw["cost"]), xv, create_graph=True)
            v = _cg(lambda p: torch.autograd.grad(g, xv, p, retain_graph=True)[0], gx.detach(),
                    kw["solver"].get("cg_tol", 1e-10), kw["solver"].get("cg_iter", 500))
            dF, dL = torch.autograd.grad(g, (Fv, Lv), v, allow_unused=True)
        neg = lambda t, ref: None if t is None else -t   # noqa: E731
        return neg(dF, F), neg(dL, L), None, None, None, None, None


def soft_sift2(F: Tensor, L: Tensor, sid: Tensor, fix: Tensor, PM: Optional[Tensor] = None, *,
               x0: Optional[Tensor] = None, reg_tikhonov: float = REG_TIKHONOV, reg_tv: float = REG_TV,
               tol: float = 1e-10, max_newton: int = 50, cg_tol: float = 1e-10, cg_iter: int = 500,
               n_streamlines: Optional[int] = None) -> Tensor:
    """Differentiable SIFT2: the coefficients x* = argmin E(x; F, L) of :func:`smooth_cost` (weights e^{x*}),
    with implicit-function gradients wrt the fixel integrals F and the streamline->fixel lengths L.

    Args:
        F: (J,) fixel FOD integrals; L: (P,) lengths of streamline sid (P,) in fixel fix (P,) (e.g.
            :func:`tractfunc.maps.fixels.soft_lengths`, differentiable in the vertices); PM: (J,) mask weights
            (default 1); x0: (A,) start (default 0; the hard :func:`sift2` coefficients converge fastest);
            reg_tikhonov / reg_tv: as tcksift2; tol: Newton stops at |grad| <= tol |grad(x0)|;
            n_streamlines: A (default sid.max() + 1).
    Returns: (A,) x* in F's dtype; differentiable wrt F and L (under torch.autograd; not torch.func).
    """
    A = int(n_streamlines) if n_streamlines is not None else int(sid.max()) + 1
    if F.ndim != 1 or L.shape != sid.shape or L.shape != fix.shape:
        raise TractfuncError(f"soft_sift2: F {tuple(F.shape)}, L {tuple(L.shape)}, sid {tuple(sid.shape)}, "
                             f"fix {tuple(fix.shape)}; expected F (J,) and L, sid, fix of one shape (P,)")
    PM = torch.ones_like(F) if PM is None else PM.to(F.dtype)
    x0 = torch.zeros(A, dtype=F.dtype, device=F.device) if x0 is None else x0.to(F.dtype)
    kw = {"cost": {"reg_tikhonov": reg_tikhonov, "reg_tv": reg_tv},
          "solver": {"tol": tol, "max_newton": max_newton, "cg_tol": cg_tol, "cg_iter": cg_iter}}
    return _Sift2Fit.apply(F, L, x0, sid, fix, PM.detach(), kw)
