"""Gradients: every differentiable piece checked against finite differences, the implicit (IFT) peak
derivative against unrolled Newton, robustness (no NaN/Inf) on adversarial fields, composability with
torch.func, the hard-mode forward left untouched by autograd, and torch.compile forward + backward.

Conventions used throughout (float64 everywhere):
* central finite differences ``(f(x + h v) - f(x - h v)) / 2h`` with ``h = 1e-6`` unless stated;
  relative error ``|fd - ad| / |ad|`` (vector norms where the derivative is a vector);
* "away from decision boundaries": a finite-difference pair is used only when every discrete outcome of
  tracking (valid-vertex mask and seed index, i.e. where each half stopped) is identical at ``+h``, ``-h``
  and the unperturbed point.  Streamlines failing that are left out and counted; each test also
  requires a minimum number of checked streamlines so the exclusion cannot hollow it out;
* exact peaks (``params.resolve(..., peak_polish=3)``, exact SH evaluation ``table=None``) so that the
  forward value is a differentiable function of its inputs (tckgen's tolerance-limited Newton is not).

Run with ``-s`` to see the measured errors.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch.autograd import gradcheck

from tractfunc.core import field as F, params as P, seeds as S, sh
from tractfunc import io
from tractfunc.core.newton import peak, tangent_basis, tangent_newton
from tractfunc.core.implicit import attach_peak
from tractfunc.core.integrate import euler, rk4
from tractfunc.core.interpolate import trilinear
from tractfunc.core.sphere import fibonacci_sphere
from tractfunc.sdstream.jacobian import direction_jacobian, seed_jacobian
from tractfunc.sdstream.step import TrackState, step
from tractfunc.core.seeds import random_directions
from tractfunc.sdstream.track import track
from tractfunc.sdstream.fixed import track_fixed

from conftest import require_philips, unit

f64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny; on a shared 2-core machine intra-op threads only add contention (the
    batched 45x3x3 einsum in sh_jet is ~100x slower with 2 contended threads than with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _report(name, err):
    print(f"\n[grad] {name}: {err:.3e}", end="")


def _rel(a, b):
    """Relative error of a against the reference b (Frobenius norms)."""
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _fd_jacobian(f, x, h=1e-6):
    """Central-difference Jacobian of f: (n,) -> (m,) at x (flat float64): (m, n)."""
    cols = []
    with torch.no_grad():
        for k in range(x.numel()):
            e = torch.zeros_like(x)
            e.view(-1)[k] = h
            cols.append(((f(x + e) - f(x - e)) / (2 * h)).reshape(-1))
    return torch.stack(cols, -1)


def _lobes(axes, weights, kappa=20.0, lmax=8):
    """SH coefficients of sum_i w_i exp(-kappa (1 - (u.a_i)^2)), least squares on a dense sphere."""
    d = fibonacci_sphere(3000).numpy()
    amp = sum(w * np.exp(-kappa * (1 - (d @ unit(a)) ** 2)) for a, w in zip(axes, weights))
    B = sh.basis(torch.as_tensor(d), lmax).numpy()
    return torch.as_tensor(np.linalg.lstsq(B, amp, rcond=None)[0])


# --------------------------------------------------------------------------------------------------
# fields


@pytest.fixture(scope="module")
def phantom64(phantom_field):
    """The built-in phantom as an exact (no Legendre table) float64 field, with exact peaks."""
    ph = phantom_field["ph"]
    fld = F.make_field(torch.as_tensor(ph.fod, dtype=f64), ph.affine, precomputed=False)
    return dict(field=fld, params=P.resolve([2, 2, 2], peak_polish=3),
                mask=F.make_mask(torch.as_tensor(ph.mask), ph.affine),
                seed_mask=torch.as_tensor(ph.seed_mask), affine=ph.affine)


def _best_box(mask, n):
    """Corner of the n^3 box holding the most mask voxels (integral image)."""
    c = np.pad(mask.astype(np.int64), ((1, 0), (1, 0), (1, 0))).cumsum(0).cumsum(1).cumsum(2)
    s = (c[n:, n:, n:] - c[:-n, n:, n:] - c[n:, :-n, n:] - c[n:, n:, :-n]
         + c[:-n, :-n, n:] + c[:-n, n:, :-n] + c[n:, :-n, :-n] - c[:-n, :-n, :-n])
    return np.unravel_index(np.argmax(s), s.shape), int(s.max())


@pytest.fixture(scope="module")
def philips64():
    """A 20^3 crop of the real Philips FOD (lmax 8) where the FA>0.3 WM mask is densest; affine shifted."""
    paths = require_philips()
    fod = io.load_fod(paths["fod"])
    wm = io.load_mask(paths["seed"])
    assert io.same_grid(fod, wm)
    n = 20
    (i, j, k), count = _best_box(wm.data, n)
    assert count > 0.4 * n ** 3
    A = fod.affine.copy()
    A[:3, 3] = A[:3, :3] @ np.array([i, j, k], dtype=np.float64) + A[:3, 3]
    data = torch.as_tensor(np.ascontiguousarray(fod.data[i:i + n, j:j + n, k:k + n]), dtype=f64)
    seed_mask = torch.as_tensor(np.ascontiguousarray(wm.data[i:i + n, j:j + n, k:k + n]))
    # the crop reproduces the original geometry: voxel (0,0,0) of the crop is voxel (i,j,k) of the image
    assert np.allclose(A @ [0, 0, 0, 1], fod.affine @ [i, j, k, 1])
    return dict(field=F.make_field(data, A, precomputed=False),
                params=P.resolve(fod.voxel_sizes, peak_polish=3), mask=None,
                seed_mask=seed_mask, affine=A)


def _data(request, name):
    return request.getfixturevalue({"phantom": "phantom64", "philips": "philips64"}[name])


def _seeds(d, n, seed, min_amp=None):
    """n random seeds in the seed mask with random initial directions; with min_amp, only seeds whose
    peak (reached from the initial direction) has at least that amplitude (so the seed is not rejected)."""
    g = torch.Generator().manual_seed(seed)
    m = n if min_amp is None else 8 * n
    pts = S.random_in_mask(d["seed_mask"], d["affine"], m, g)
    dirs = random_directions(m, g, f64)
    if min_amp is None:
        return pts, dirs
    keep = torch.nonzero(peak(d["field"].sample(pts).values, dirs, None, polish_iter=3).amp > min_amp).squeeze(1)
    assert keep.numel() >= n
    return pts[keep[:n]], dirs[keep[:n]]


# --------------------------------------------------------------------------------------------------
# 1. primitives against finite differences


def test_sh_jet_gradcheck_coeffs_and_tangent_direction():
    """amp, Riemannian grad and Hessian of sh_jet wrt coefficients and wrt the direction moved in its
    tangent plane (u = normalize(u0 + E t)), including the z pole; and the jet is the derivative of the
    amplitude along that (second-order) retraction: d amp = E^T grad, d^2 amp = E^T hess E."""
    g = torch.Generator().manual_seed(0)
    u0 = torch.stack([torch.tensor([0.0, 0.0, 1.0], dtype=f64), torch.tensor([0.0, 0.0, -1.0], dtype=f64),
                      torch.as_tensor(unit([1e-9, 0, 1])), torch.as_tensor(unit([0.3, -0.5, 0.2]))])
    E = tangent_basis(u0)
    for lmax in (4, 8):
        c = torch.randn(4, sh.n_coeffs(lmax), generator=g, dtype=f64).requires_grad_(True)
        t = (0.1 * torch.randn(4, 2, generator=g, dtype=f64)).requires_grad_(True)

        def jet(c, t):
            u = u0 + (E @ t.unsqueeze(-1)).squeeze(-1)
            return tuple(sh.sh_jet(c, u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)))
        # polynomial in (c, u): central differences with eps 1e-6 are good to ~1e-9 relative
        assert gradcheck(jet, (c, t), eps=1e-6, atol=1e-7, rtol=1e-6)
        J_ad = torch.autograd.functional.jacobian(lambda t: jet(c.detach(), t)[2], t.detach())
        J_fd = _fd_jacobian(lambda t: jet(c.detach(), t)[2], t.detach()).reshape(J_ad.shape)
        err = _rel(J_fd, J_ad)
        _report(f"sh_jet hessian wrt tangent direction, lmax {lmax} (rel, FD h=1e-6)", err)
        assert err < 1e-6
    # the jet is the derivative of the amplitude on the sphere, at the pole too
    c = torch.randn(45, generator=g, dtype=f64)
    for b in range(4):
        def amp(t, b=b):
            u = u0[b] + E[b] @ t
            return sh.amplitude(c, u / torch.linalg.vector_norm(u))
        t0 = torch.zeros(2, dtype=f64)
        j = sh.sh_jet(c, u0[b])
        gr = torch.autograd.functional.jacobian(amp, t0)
        he = torch.autograd.functional.hessian(amp, t0)
        assert torch.allclose(gr, E[b].T @ j.grad, rtol=0, atol=1e-12)
        assert torch.allclose(he, E[b].T @ j.hess @ E[b], rtol=0, atol=1e-11)


def test_trilinear_gradcheck_inside_cells():
    """Trilinear sampling wrt the volume and the voxel coordinates, strictly inside cells (fractional
    parts in [0.1, 0.9], so no corner weight falls under MRtrix's 1e-6 drop rule)."""
    g = torch.Generator().manual_seed(1)
    vol = torch.randn(4, 5, 3, 2, generator=g, dtype=f64).requires_grad_(True)
    base = torch.stack([torch.randint(0, d - 1, (6,), generator=g) for d in (4, 5, 3)], -1).to(f64)
    vox = (base + 0.1 + 0.8 * torch.rand(6, 3, generator=g, dtype=f64)).requires_grad_(True)
    fn = lambda v, x: trilinear(v, x).values
    assert bool(trilinear(vol, vox).inside.all())
    assert gradcheck(fn, (vol, vox), eps=1e-6, atol=1e-8, rtol=1e-7)
    J_ad = torch.autograd.functional.jacobian(lambda x: fn(vol.detach(), x), vox.detach())
    err = _rel(_fd_jacobian(lambda x: fn(vol.detach(), x), vox.detach()).reshape(J_ad.shape), J_ad)
    _report("trilinear wrt vox (rel, FD h=1e-6)", err)
    assert err < 1e-8


def test_trilinear_derivative_on_a_voxel_centre_plane():
    """At x exactly on a voxel centre the interpolant is linear on [x, x + 1): autograd (floor picks the
    right-hand cell) should give the right-sided difference quotient, exact here up to rounding."""
    g = torch.Generator().manual_seed(3)
    vol = torch.randn(4, 4, 4, 2, generator=g, dtype=f64) + 3.0     # FOD-like: a large l = 0 part
    x = torch.tensor([1.0, 1.3, 1.6], dtype=f64, requires_grad=True)
    trilinear(vol, x).values.sum().backward()
    h = 1e-4
    f = lambda d: float(trilinear(vol, torch.tensor([1.0 + d, 1.3, 1.6], dtype=f64)).values.sum())
    right = (f(h) - f(0.0)) / h
    _report(f"trilinear d/dx on a voxel-centre plane: autograd {float(x.grad[0]):.6f} vs right FD {right:.6f}",
            abs(float(x.grad[0]) - right))
    assert abs(float(x.grad[0]) - right) < 1e-8 * (1 + abs(right))


def _two_lobes():
    a, b = unit([0.9, 0.3, 0.2]), unit([-0.2, 0.7, 0.6])
    return _lobes([a, b], [1.0, 0.6]), torch.as_tensor(unit(a + [0.15, -0.1, 0.05]))


def _ift_peak(c, u0):
    """The tracker's peak: Newton (+ exact polish) on detached inputs, IFT derivative grafted on."""
    p = peak(c.detach(), u0, None, polish_iter=4, early_exit=True)
    return attach_peak(c, p.dir, p.amp)


def test_ift_peak_matches_finite_differences_and_unrolled_newton():
    """The tracker's peak (Newton on detached inputs + IFT graft) has the derivative of the exact peak:
    vs central differences of the re-searched peak (rel <= 1e-6) and vs autograd unrolled through all
    Newton iterations (rel <= 1e-8); the amplitude has the envelope derivative Y(u*)."""
    c, u0 = _two_lobes()
    c = c + 0.01 * torch.randn(45, generator=torch.Generator().manual_seed(2), dtype=f64)  # no symmetry
    J_ift = torch.autograd.functional.jacobian(lambda c: _ift_peak(c, u0).dir, c)
    Ja_ift = torch.autograd.functional.jacobian(lambda c: _ift_peak(c, u0).amp, c)
    # finite differences of the exact peak, all 45 coefficient perturbations in one batch
    h = 1e-6
    eye = torch.eye(45, dtype=f64)
    with torch.no_grad():
        pp = peak(c + h * eye, u0.expand(45, 3), None, polish_iter=4, early_exit=True)
        pm = peak(c - h * eye, u0.expand(45, 3), None, polish_iter=4, early_exit=True)
    J_fd = ((pp.dir - pm.dir) / (2 * h)).T
    Ja_fd = (pp.amp - pm.amp) / (2 * h)
    e_fd, ea_fd = _rel(J_fd, J_ift), _rel(Ja_fd, Ja_ift)
    # unrolled: autograd through all 50 (tckgen) Newton moves and 8 full Newton iterations
    J_un = torch.autograd.functional.jacobian(lambda c: peak(c, u0, None, polish_iter=8).dir, c)
    Ja_un = torch.autograd.functional.jacobian(lambda c: peak(c, u0, None, polish_iter=8).amp, c)
    e_un, ea_un = _rel(J_ift, J_un), _rel(Ja_ift, Ja_un)
    _report("peak dir: IFT vs FD (rel)", e_fd)
    _report("peak amp: IFT (envelope) vs FD (rel)", ea_fd)
    _report("peak dir: IFT vs unrolled Newton autograd (rel)", e_un)
    _report("peak amp: IFT vs unrolled Newton autograd (rel)", ea_un)
    assert e_fd < 1e-6 and ea_fd < 1e-6
    assert e_un < 1e-8 and ea_un < 1e-8
    # tangent: the peak stays unit, so its derivative is orthogonal to it
    assert float((_ift_peak(c, u0).dir @ J_ift).abs().max()) < 1e-12
    # the standard tool agrees too (its own tolerances)
    assert gradcheck(lambda c: tuple(_ift_peak(c, u0)), (c.clone().requires_grad_(True),), eps=1e-6,
                     atol=1e-7, rtol=1e-5)


def _step_inputs(d, prm, fn, n, seed):
    """n seed points started along their peak, whose step is taken (no stop) with the peak amplitude
    0.2 above the cutoff at the start (so no stopping rule is near its threshold)."""
    pts, dirs = _seeds(d, 8 * n, seed)
    pk = peak(d["field"].sample(pts).values, dirs, None, polish_iter=3)
    m = fn(d["field"], prm, pts, pk.dir)
    keep = torch.nonzero((pk.amp > prm.cutoff + 0.2) & (m.reason == 0)).squeeze(1)[:n]
    assert keep.numel() == n
    return pts[keep], pk.dir[keep]


@pytest.mark.parametrize("integrator", ["euler", "rk4"])
def test_one_step_wrt_position_and_sh_volume(phantom64, integrator):
    """One Euler / RK4 step (new position, direction, amplitude) wrt the start position (full per-point
    Jacobians) and wrt the SH volume along a random direction: central differences, rel <= 1e-6."""
    d = phantom64
    fld = d["field"]
    prm = P.resolve([2, 2, 2], peak_polish=3, rk4=integrator == "rk4")
    fn = euler if integrator == "euler" else rk4
    pts, dirs = _step_inputs(d, prm, fn, 4, seed=20)

    def move(fl, p):
        m = fn(fl, prm, p, dirs)
        return m, torch.cat([m.pos, m.dir, m.amp.unsqueeze(-1)], -1)
    m0, _ = move(fld, pts)
    assert bool((m0.reason == 0).all())
    h = 1e-6
    # wrt position: the (B, 7, 3) per-point Jacobians (points are independent: perturb coordinate k of
    # every point at once)
    J_ad = torch.autograd.functional.jacobian(lambda p: move(fld, p)[1].sum(0), pts).permute(1, 0, 2)
    J_fd = torch.zeros_like(J_ad)
    for k in range(3):
        e = torch.zeros(3, dtype=f64)
        e[k] = h
        mp, op = move(fld, pts + e)
        mm, om = move(fld, pts - e)
        assert bool((mp.reason == 0).all() and (mm.reason == 0).all())   # no stop flipped by +-h
        J_fd[..., k] = (op - om) / (2 * h)
    err_p = _rel(J_fd, J_ad)
    # wrt the SH volume: derivative along a random direction V in coefficient space
    V = torch.randn(fld.sh.shape, generator=torch.Generator().manual_seed(21), dtype=f64) * fld.nonzero[..., None]
    t0 = torch.zeros((), dtype=f64)
    g_sh = lambda t: move(fld._replace(sh=fld.sh + t * V), pts)
    D_ad = torch.autograd.functional.jacobian(lambda t: g_sh(t)[1], t0)
    (mp, op), (mm, om) = g_sh(t0 + h), g_sh(t0 - h)
    assert bool((mp.reason == 0).all() and (mm.reason == 0).all())
    D_fd = (op - om) / (2 * h)
    err_v = _rel(D_fd, D_ad)
    _report(f"{integrator} step wrt position (rel, FD h=1e-6)", err_p)
    _report(f"{integrator} step wrt SH volume, random direction (rel, FD h=1e-6)", err_v)
    assert err_p < 1e-6 and err_v < 1e-6


# --------------------------------------------------------------------------------------------------
# whole tracks


def _track_loss(d, W, T, fld=None, seeds=None, dirs=None, prm=None, **kw):
    """Per-streamline scalar losses sum_v W[b, v] . x[b, v] over valid vertices, plus the discrete outcome."""
    r = track_fixed(fld if fld is not None else d["field"], prm or d["params"], seeds, dirs, T, d["mask"], **kw)
    L = (torch.where(r.valid.unsqueeze(-1), r.vertices, torch.zeros_like(r.vertices)) * W).sum((1, 2))
    return L, r


def _same_outcome(r, *others):
    return torch.stack([(o.valid == r.valid).all(1) & (o.seed_index == r.seed_index) for o in others]).all(0)


@pytest.mark.parametrize("data", ["phantom", "philips"])
def test_whole_track_gradient_wrt_seeds(request, data):
    """Whole streamlines (up to 30 steps per half, 60 in all): gradient of a random linear functional of the
    valid vertices wrt each seed, by backward vs central differences (rel <= 1e-6), on the phantom and on
    a real in-vivo crop."""
    d = _data(request, data)
    B, T, h = 6, 30, 1e-6
    pts, dirs = _seeds(d, B, seed=30, min_amp=0.2)
    W = torch.randn(B, 2 * T + 1, 3, generator=torch.Generator().manual_seed(31), dtype=f64)
    s = pts.clone().requires_grad_(True)
    L, r0 = _track_loss(d, W, T, seeds=s, dirs=dirs)
    L.sum().backward()
    G = s.grad   # (B, 3): streamlines are independent, so row b is grad of L_b
    fd = torch.zeros_like(G)
    long = r0.valid.sum(1) > 20   # at least 20 steps taken over both halves
    same = torch.ones(B, dtype=torch.bool)
    with torch.no_grad():
        for k in range(3):   # perturb coordinate k of every seed at once
            e = torch.zeros(3, dtype=f64)
            e[k] = h
            Lp, rp = _track_loss(d, W, T, seeds=pts + e, dirs=dirs)
            Lm, rm = _track_loss(d, W, T, seeds=pts - e, dirs=dirs)
            same &= _same_outcome(r0, rp, rm)
            fd[:, k] = (Lp - Lm) / (2 * h)
    ok = long & same
    rel = torch.linalg.vector_norm(fd - G, dim=1) / torch.linalg.vector_norm(G, dim=1)
    print(f"\n[grad] {data}: whole-track seed gradient, vertices per streamline {r0.valid.sum(1).tolist()}, "
          f"same outcome at +-h {same.tolist()}, rel err {[f'{x:.1e}' for x in rel.tolist()]}", end="")
    assert int(ok.sum()) >= 3
    assert float(rel[ok].max()) < 1e-6
    assert torch.isfinite(G).all()


@pytest.mark.parametrize("data", ["phantom", "philips"])
def test_whole_track_gradient_wrt_sh_volume(request, data):
    """Whole streamlines: derivative of each streamline's loss along a random direction V in coefficient
    space (all voxels holding data), backward vs central differences (rel <= 1e-6)."""
    d = _data(request, data)
    fld = d["field"]
    B, T, h = 4, 30, 1e-6
    pts, dirs = _seeds(d, B, seed=40, min_amp=0.2)
    g = torch.Generator().manual_seed(41)
    W = torch.randn(B, 2 * T + 1, 3, generator=g, dtype=f64)
    V = torch.randn(fld.sh.shape, generator=g, dtype=f64) * fld.nonzero.unsqueeze(-1)
    V = V * fld.sh.abs().max()    # direction scaled like the data
    shv = fld.sh.clone().requires_grad_(True)
    L, r0 = _track_loss(d, W, T, fld=fld._replace(sh=shv), seeds=pts, dirs=dirs)
    ad = torch.stack([(torch.autograd.grad(L[b], shv, retain_graph=b < B - 1)[0] * V).sum() for b in range(B)])
    with torch.no_grad():
        Lp, rp = _track_loss(d, W, T, fld=fld._replace(sh=fld.sh + h * V), seeds=pts, dirs=dirs)
        Lm, rm = _track_loss(d, W, T, fld=fld._replace(sh=fld.sh - h * V), seeds=pts, dirs=dirs)
    fd = (Lp - Lm) / (2 * h)
    same = _same_outcome(r0, rp, rm)
    ok = same & (r0.valid.sum(1) > 20)   # at least 20 steps
    rel = (fd - ad).abs() / ad.abs()
    print(f"\n[grad] {data}: whole-track SH-volume directional derivative, vertices {r0.valid.sum(1).tolist()}, "
          f"same outcome at +-h {same.tolist()}, rel err {[f'{x:.1e}' for x in rel.tolist()]}", end="")
    assert int(ok.sum()) >= 3
    assert float(rel[ok].max()) < 1e-6


@pytest.mark.parametrize("integrator", ["euler", "rk4"])
def test_whole_track_gradient_wrt_step_size(phantom64, integrator):
    """``params._replace(step=tensor)``: d(loss)/d(step) by autograd vs central differences (h = 1e-7 mm)."""
    d = phantom64
    B, T, h = (4, 20, 1e-7) if integrator == "euler" else (3, 8, 1e-7)   # an RK4 step costs 5 peaks
    prm = P.resolve([2, 2, 2], peak_polish=3, rk4=integrator == "rk4")
    pts, dirs = _seeds(d, B, seed=50, min_amp=0.2)
    W = torch.randn(B, 2 * T + 1, 3, generator=torch.Generator().manual_seed(51), dtype=f64)
    stp = torch.tensor(prm.step, dtype=f64, requires_grad=True)
    L, r0 = _track_loss(d, W, T, seeds=pts, dirs=dirs, prm=prm._replace(step=stp))
    ad = torch.stack([torch.autograd.grad(L[b], stp, retain_graph=b < B - 1)[0] for b in range(B)])
    with torch.no_grad():
        Lp, rp = _track_loss(d, W, T, seeds=pts, dirs=dirs, prm=prm._replace(step=prm.step + h))
        Lm, rm = _track_loss(d, W, T, seeds=pts, dirs=dirs, prm=prm._replace(step=prm.step - h))
    fd = (Lp - Lm) / (2 * h)
    same = _same_outcome(r0, rp, rm)
    ok = same & (r0.valid.sum(1) > T // 2)
    rel = (fd - ad).abs() / ad.abs()
    print(f"\n[grad] {integrator}: d loss / d step, vertices {r0.valid.sum(1).tolist()}, same outcome at +-h "
          f"{same.tolist()}, rel err {[f'{x:.1e}' for x in rel.tolist()]}", end="")
    assert int(ok.sum()) >= 2
    assert float(rel[ok].max()) < 1e-6


# --------------------------------------------------------------------------------------------------
# 2. IFT: O(1) memory in the number of Newton iterations


def _saved(fn):
    """Run fn under a saved-tensors hook: (output, number of tensors autograd saved, their bytes)."""
    n = [0, 0]

    def pack(t):
        n[0] += 1
        n[1] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, n[0], n[1]


def _graph_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        todo += [g for g, _ in f.next_functions]
    return len(seen)


def test_ift_graph_does_not_grow_with_newton_iterations(phantom64):
    """O(1) memory: what autograd saves for the IFT peak (tensor count, bytes, graph nodes) is identical
    for 50 + 1 and 250 + 20 Newton iterations, while unrolling grows with them; both give the same
    gradient (rel <= 1e-8).  In track_fixed, the polish count does not change the saved tensors."""
    c, u0 = _two_lobes()
    c = c.clone().requires_grad_(True)
    rows = {}
    for it, pol in [(50, 1), (250, 20)]:
        ift, n_ift, b_ift = _saved(lambda: attach_peak(c, *peak(c.detach(), u0, None, max_iter=it, polish_iter=pol)))
        unr, n_unr, b_unr = _saved(lambda: peak(c, u0, None, max_iter=it, polish_iter=pol))
        rows[it, pol] = (n_ift, b_ift, _graph_nodes(ift.dir), n_unr, b_unr, _graph_nodes(unr.dir))
        print(f"\n[grad] Newton {it} moves + {pol} polish: IFT saves {n_ift} tensors ({b_ift} B, "
              f"{rows[it, pol][2]} graph nodes); unrolled saves {n_unr} ({b_unr} B, {rows[it, pol][5]} nodes)", end="")
        g_ift = torch.autograd.grad(ift.dir @ torch.tensor([0.3, -0.2, 0.5], dtype=f64), c)[0]
        g_unr = torch.autograd.grad(unr.dir @ torch.tensor([0.3, -0.2, 0.5], dtype=f64), c)[0]
        assert _rel(g_ift, g_unr) < 1e-8
    small, large = rows[50, 1], rows[250, 20]
    assert small[:3] == large[:3]                        # IFT: identical graph, whatever the iteration count
    assert large[3] > 4 * small[3] and large[5] > 4 * small[5]   # unrolled: grows with the iterations
    assert large[0] * 50 < large[3]
    # the same inside the tracker: the peak polish count does not change what autograd stores
    d = phantom64
    pts, dirs = _seeds(d, 4, seed=60)
    shv = d["field"].sh.clone().requires_grad_(True)
    counts = []
    for pol in (0, 12):
        prm = d["params"]._replace(peak_polish=pol)
        r, n, nb = _saved(lambda: track_fixed(d["field"]._replace(sh=shv), prm, pts, dirs, 5, d["mask"]))
        counts.append((n, nb, _graph_nodes(r.vertices)))
    print(f"\n[grad] track_fixed 5 steps, polish 0 vs 12: saved (tensors, bytes, nodes) {counts}", end="")
    assert counts[0] == counts[1]


# --------------------------------------------------------------------------------------------------
# 3. no NaN / Inf in any gradient on adversarial fields

ZONAL_SCALE = 20.0


def _zonal_z(lmax):
    """Coefficients of a smooth positive zonal lobe about z (peaks exactly at +-z)."""
    c = torch.zeros(sh.n_coeffs(lmax), dtype=f64)
    for l in range(0, lmax + 1, 2):
        c[l * (l + 1) // 2] = math.sqrt((2 * l + 1) / (4 * math.pi)) * math.exp(-l * (l + 1) / ZONAL_SCALE)
    return c


@st.composite
def scenes(draw):
    lmax = draw(st.sampled_from([4, 8]))
    kind = draw(st.sampled_from(["random", "zonal_z", "at_cutoff", "flat"]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    zero_frac = draw(st.sampled_from([0.0, 0.3]))
    seed_kinds = draw(st.lists(st.sampled_from(["random", "centre", "face", "zero_voxel", "outside"]),
                               min_size=4, max_size=4))
    dir_kinds = draw(st.lists(st.sampled_from(["random", "+z", "-z"]), min_size=4, max_size=4))
    return dict(lmax=lmax, kind=kind, seed=seed, zero_frac=zero_frac, seed_kinds=seed_kinds, dir_kinds=dir_kinds,
                rk4=draw(st.booleans()), temperature=draw(st.sampled_from([None, 0.1])),
                use_mask=draw(st.booleans()), precomputed=draw(st.booleans()),
                polish=draw(st.sampled_from([0, 3])), jacobian=draw(st.sampled_from([False, False, True])))


def _scene_tensors(sc):
    """A 4x4x4 FOD volume (2 mm voxels, voxel k at 2k - 3 mm), seeds, directions, mask from a scene."""
    rng, lmax, dims = np.random.default_rng(sc["seed"]), sc["lmax"], (4, 4, 4)
    N = sh.n_coeffs(lmax)
    prm = P.resolve([2, 2, 2], rk4=sc["rk4"], peak_polish=sc["polish"])
    if sc["kind"] == "random":
        c = rng.normal(0, 0.3, dims + (N,))
        c[..., 0] = 1 + rng.uniform(0, 1, dims)
    elif sc["kind"] == "zonal_z":
        c = _zonal_z(lmax).numpy() * rng.uniform(0.5, 1.5, dims + (1,))
    elif sc["kind"] == "at_cutoff":   # peak amplitude exactly the cutoff in every voxel
        z = _zonal_z(lmax)
        zz = torch.tensor([0.0, 0.0, 1.0], dtype=f64)
        z = z * (prm.cutoff / float(sh.amplitude(z, zz)))
        assert abs(float(sh.amplitude(z, zz)) - prm.cutoff) <= 1e-16
        c = np.broadcast_to(z.numpy(), dims + (N,)).copy()
    else:   # flat: only l = 0
        c = np.zeros(dims + (N,))
        c[..., 0] = rng.uniform(0.5, 1.5, dims)
    c[rng.random(dims) < sc["zero_frac"]] = 0
    c[3, 3, 3] = 0                      # always one all-zero voxel
    vox = []
    for k in sc["seed_kinds"]:
        if k == "random":
            vox.append(rng.uniform(0.2, 2.8, 3))
        elif k == "centre":
            vox.append(rng.integers(0, 3, 3).astype(float))
        elif k == "face":               # exactly on a face between two voxels (nearest-voxel tie)
            v = rng.integers(0, 3, 3).astype(float)
            v[rng.integers(0, 3)] += 0.5
            vox.append(v)
        elif k == "zero_voxel":
            vox.append(np.array([3.0, 3.0, 3.0]))
        else:
            vox.append(np.array([-1.0, 1.0, 1.0]))
    seeds = torch.as_tensor(2 * np.stack(vox) - 3, dtype=f64)
    dirs = []
    for k in sc["dir_kinds"]:
        dirs.append({"+z": [0.0, 0.0, 1.0], "-z": [0.0, 0.0, -1.0]}.get(k, unit(rng.normal(size=3))))
    dirs = torch.as_tensor(np.array(dirs), dtype=f64)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -3
    mask = F.make_mask(torch.as_tensor(rng.random(dims) < 0.8), affine) if sc["use_mask"] else None
    W = torch.as_tensor(rng.normal(size=(4, 2 * 4 + 1, 3)), dtype=f64)   # loss weights for T = 4 steps
    return torch.as_tensor(c, dtype=f64), affine, seeds, dirs, mask, prm, W


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenes())
def test_gradients_finite_on_adversarial_fields(sc):
    """Hard and soft, Euler and RK4, exact and tckgen-table peaks, lmax 4 and 8, on 4x4x4 fields that are
    random, zonal about z (peaks exactly at the pole, start directions exactly +-z), exactly at the cutoff
    or flat (l = 0 only), with all-zero voxels, a random tracking mask, seeds on voxel centres and faces,
    in a zero voxel or outside the image (dead from step 0): gradients wrt the FOD, seeds and step size
    are finite; dead seeds get exactly zero gradient; a flat FOD gives vertices with zero FOD gradient."""
    c, affine, seeds, dirs, mask, prm, W = _scene_tensors(sc)
    T = 4
    fld0 = F.make_field(c, affine, precomputed=sc["precomputed"])
    shv = c.clone().requires_grad_(True)
    s = seeds.clone().requires_grad_(True)
    stp = torch.tensor(prm.step, dtype=f64, requires_grad=True)
    fld = fld0._replace(sh=shv)
    r = track_fixed(fld, prm._replace(step=stp), s, dirs, T, mask, temperature=sc["temperature"])
    x = torch.where(r.valid.unsqueeze(-1), r.vertices, torch.zeros_like(r.vertices))
    loss_v = (x * W).sum()
    loss = (r.weights.unsqueeze(-1) * x * W).sum() + r.weights.sum() + loss_v
    grads = torch.autograd.grad(loss, (shv, s, stp), retain_graph=True)
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.isfinite(r.weights).all()
    dead = ~r.valid[:, 0]             # seed rejected: dead from step 0 (outside, zero voxel, mask, cutoff)
    for b, k in enumerate(sc["seed_kinds"]):
        if k in ("zero_voxel", "outside"):
            assert bool(dead[b]) and not r.valid[b].any()
    assert torch.equal(grads[1][dead], torch.zeros_like(grads[1][dead]))
    if sc["kind"] == "flat":          # no peak to follow: the direction has zero derivative wrt the FOD
        g_v = torch.autograd.grad(loss_v, shv, allow_unused=True)[0]
        assert g_v is None or torch.equal(g_v, torch.zeros_like(g_v))
    if sc["jacobian"]:   # forward mode (fixed-iteration peak path; Euler, 2 steps: RK4 under jvp is slow)
        J = seed_jacobian(fld0, P.resolve([2, 2, 2], peak_polish=sc["polish"]), seeds, dirs, 2, mask,
                          sc["temperature"])
        assert torch.isfinite(J).all()


def test_flat_fod_peak_has_zero_direction_derivative():
    c = torch.zeros(45, dtype=f64)
    c[0] = 1.3
    for u0 in (torch.tensor([0.0, 0.0, 1.0], dtype=f64), torch.as_tensor(unit([0.3, -0.2, 0.9]))):
        J = torch.autograd.functional.jacobian(lambda c: _ift_peak(c, u0).dir, c)
        Ja = torch.autograd.functional.jacobian(lambda c: _ift_peak(c, u0).amp, c)
        assert torch.equal(J, torch.zeros_like(J))
        assert torch.allclose(Ja, sh.basis(u0, 8), rtol=0, atol=1e-14)   # envelope derivative Y(u) stays


# --------------------------------------------------------------------------------------------------
# 4. composability with torch.func


def test_vmap_of_single_track_equals_batch_values_and_gradients(phantom64):
    """vmap(track one streamline) == batched track_fixed (soft weights included), and
    vmap(grad(one streamline's loss)) == reverse mode on the batch (streamlines are independent)."""
    d = phantom64
    B, T, tmp = 4, 8, 0.05
    pts, dirs = _seeds(d, B, seed=70, min_amp=0.2)
    W = torch.randn(B, 2 * T + 1, 3, generator=torch.Generator().manual_seed(71), dtype=f64)

    def one(s, u, w):
        r = track_fixed(d["field"], d["params"], s[None], u[None], T, d["mask"], temperature=tmp)
        loss = (r.weights[0].unsqueeze(-1) * r.vertices[0] * w).sum()
        return loss, (r.vertices[0], r.valid[0], r.weights[0])
    _, (v, valid, w) = torch.func.vmap(one)(pts, dirs, W)
    s = pts.clone().requires_grad_(True)
    r = track_fixed(d["field"], d["params"], s, dirs, T, d["mask"], temperature=tmp)
    lb = (r.weights.unsqueeze(-1) * r.vertices * W).sum((1, 2))
    lb.sum().backward()
    assert torch.equal(valid, r.valid)
    mv = valid.unsqueeze(-1)
    assert torch.allclose(torch.where(mv, v, 0), torch.where(mv, r.vertices, 0).detach(), rtol=0, atol=1e-12)
    assert torch.allclose(w, r.weights.detach(), rtol=1e-12, atol=0)
    g = torch.func.vmap(torch.func.grad(lambda s, u, w: one(s, u, w)[0]))(pts, dirs, W)
    err = _rel(g, s.grad)
    _report("vmap(grad(one streamline)) vs batched backward (rel)", err)
    assert err < 1e-10


def _one_track(d, T, **kw):
    return lambda s, u: track_fixed(d["field"], d["params"], s[None], u[None], T, d["mask"], **kw).vertices[0]


def test_per_streamline_jacobians_jacrev_jacfwd_seed_and_direction_jacobian(phantom64):
    """Per-streamline Jacobians of all vertices (2T+1, 3) wrt the seed (3,) and the initial direction (3,):
    reverse mode (jacrev) == forward mode (jacfwd); the batched seed_jacobian (N, 2T+1, 3, 3) equals the
    per-streamline jacrev and is the identity at the seed vertex; both match central differences
    (h = 1e-6) on streamlines whose stops do not move within +-h; direction_jacobian is exactly zero (the
    start direction only selects the basin of attraction of the seed peak) and so are its differences."""
    d = phantom64
    N, T, h = 3, 5, 1e-6
    fld, prm, mask = d["field"], d["params"], d["mask"]
    pts, dirs = _seeds(d, N, seed=90, min_amp=0.2)
    r = track_fixed(fld, prm, pts, dirs, T, mask)
    J = seed_jacobian(fld, prm, pts, dirs, T, mask)
    D = direction_jacobian(fld, prm, pts, dirs, T, mask)
    assert J.shape == D.shape == (N, 2 * T + 1, 3, 3)
    assert torch.equal(D, torch.zeros_like(D))
    eye = torch.eye(3, dtype=f64)
    f = _one_track(d, T)
    for b in range(N):
        assert bool(r.valid[b, 0])
        assert torch.equal(J[b, int(r.seed_index[b])], eye)          # the seed vertex is the seed
        Jr = torch.func.jacrev(f, argnums=0)(pts[b], dirs[b])
        v = r.valid[b]
        err = _rel(J[b][v], Jr[v])
        _report(f"seed_jacobian (batched jvp) vs per-streamline jacrev, streamline {b} (rel)", err)
        assert err < 1e-12 and torch.isfinite(Jr).all()
        if b == 0:
            Jf = torch.func.jacfwd(f, argnums=0)(pts[b], dirs[b])
            err = _rel(Jf, Jr)
            _report("per-streamline seed Jacobian jacfwd vs jacrev (rel)", err)
            assert err < 1e-12
            Dr = torch.func.jacrev(f, argnums=1)(pts[b], dirs[b])
            Df = torch.func.jacfwd(f, argnums=1)(pts[b], dirs[b])
            assert torch.equal(Dr, torch.zeros_like(Dr)) and torch.equal(Df, torch.zeros_like(Df))
    # central differences, one coordinate at a time for all streamlines at once (they are independent)
    same_s, same_d = torch.ones(N, dtype=torch.bool), torch.ones(N, dtype=torch.bool)
    fd = torch.zeros_like(J)
    worst_d = 0.0
    with torch.no_grad():
        for k in range(3):
            e = torch.zeros(3, dtype=f64)
            e[k] = h
            rp = track_fixed(fld, prm, pts + e, dirs, T, mask)
            rm = track_fixed(fld, prm, pts - e, dirs, T, mask)
            same_s &= _same_outcome(r, rp, rm)
            fd[..., k] = (rp.vertices - rm.vertices) / (2 * h)
            rp = track_fixed(fld, prm, pts, dirs + e, T, mask)
            rm = track_fixed(fld, prm, pts, dirs - e, T, mask)
            sd = _same_outcome(r, rp, rm)
            same_d &= sd
            dfd = (rp.vertices - rm.vertices) / (2 * h)
            worst_d = max(worst_d, float(torch.where((r.valid & sd.unsqueeze(1)).unsqueeze(-1), dfd, 0).abs().max()))
    errs = [_rel(fd[b][r.valid[b]], J[b][r.valid[b]]) for b in range(N)]
    print(f"\n[grad] seed_jacobian vs FD: same outcome {same_s.tolist()}, rel err {[f'{x:.1e}' for x in errs]}; "
          f"direction FD: same outcome {same_d.tolist()}, max |FD| {worst_d:.1e} mm per unit", end="")
    assert int(same_s.sum()) >= 2 and int(same_d.sum()) >= 2
    assert max(e for e, ok in zip(errs, same_s.tolist()) if ok) < 1e-6
    assert worst_d < 1e-6


# --------------------------------------------------------------------------------------------------
# 5. the hard-mode forward is untouched by autograd; soft mode and checkpointing


def test_hard_mode_forward_identical_with_requires_grad(phantom_field, phantom64):
    """requires_grad FOD and seeds switch the peak to the IFT graft, whose value is the no-grad peak bit
    for bit: track_fixed output and eager track streamlines are torch.equal to the no-grad runs, in
    tckgen mode (float32, Legendre table, no polish) and in exact mode (float64, polish 3)."""
    short = dict(max_length=12.0, min_length=2.0)    # <= 63 vertices, so the eager tracker stops soon
    cases = [("tckgen float32 (Legendre table, no polish)", phantom_field["field32"], P.resolve([2, 2, 2], **short),
              torch.float32),
             ("exact float64 (polish 3)", phantom64["field"], P.resolve([2, 2, 2], peak_polish=3, **short), f64)]
    for name, fld, prm, dt in cases:
        pts, dirs = _seeds(phantom64, 10, seed=110)
        pts, dirs = pts.to(dt), dirs.to(dt)
        mask = phantom64["mask"]
        with torch.no_grad():
            r0 = track_fixed(fld, prm, pts, dirs, 20, mask)
            e0 = track(fld, prm, pts, dirs, mask=mask, engine="eager")   # the PyTorch tracker, as e1
        shv = fld.sh.clone().requires_grad_(True)
        s = pts.clone().requires_grad_(True)
        r1 = track_fixed(fld._replace(sh=shv), prm, s, dirs, 20, mask)
        e1 = track(fld._replace(sh=shv), prm, s, dirs, mask=mask, engine="eager")
        assert r1.vertices.requires_grad
        for a, b in zip(r0, r1):
            assert torch.equal(a, b.detach()), name
        assert len(e0.streamlines()) == len(e1.streamlines()) >= 5
        assert all(torch.equal(a, b.detach()) for a, b in zip(e0.streamlines(), e1.streamlines())), name
        assert torch.equal(e0.reasons, e1.reasons)


def test_soft_termination_tiny_temperature_is_the_hard_indicator(phantom64):
    """temperature -> 0: survival weights -> 1 on the vertices hard tracking keeps and -> 0 beyond its
    stops (the soft half continues through cutoff / angle stops, so vertices are aligned at the seed).
    The phantom is scaled by a ramp along one image axis and tracked with 1 mm steps, cutoff 0.3, so that
    streamlines do run into the cutoff."""
    d = phantom64
    B, T = 8, 25
    ramp = torch.linspace(0.05, 1.2, d["field"].sh.shape[0], dtype=f64)[:, None, None, None]
    fld = d["field"]._replace(sh=d["field"].sh * ramp)
    prm = P.resolve([2, 2, 2], peak_polish=3, cutoff=0.3, step=1.0)
    pts, dirs = _seeds(d, B, seed=120)
    hard = track_fixed(fld, prm, pts, dirs, T, d["mask"])
    soft = track_fixed(fld, prm, pts, dirs, T, d["mask"], temperature=1e-8)
    worst = 0.0
    for b in range(B):
        for o in range(-T, T + 1):   # offset from the seed vertex, in both outputs
            ih, is_ = int(hard.seed_index[b]) + o, int(soft.seed_index[b]) + o
            hv = 0 <= ih <= 2 * T and bool(hard.valid[b, ih])
            ws = float(soft.weights[b, is_]) if 0 <= is_ <= 2 * T else 0.0
            worst = max(worst, abs(ws - float(hv)))
            if hv:
                assert torch.equal(soft.vertices[b, is_], hard.vertices[b, ih])
    cutoff_stops = int((hard.reason_fwd == 2).sum() + (hard.reason_bwd == 2).sum())
    soft_longer = int((soft.valid.sum(1) > hard.valid.sum(1)).sum())
    print(f"\n[grad] soft T=1e-8: max |weight - hard indicator| = {worst:.1e}; {cutoff_stops} hard cutoff stops, "
          f"soft path longer for {soft_longer}/{B} streamlines", end="")
    assert cutoff_stops >= 1 and soft_longer >= 1
    assert worst < 1e-6


@pytest.mark.parametrize("temperature", [None, 0.05])
def test_checkpointing_same_forward_and_gradients(phantom64, temperature):
    """checkpoint=7 (chunks not dividing T = 20) recomputes the forward in backward: the forward is
    torch.equal and the gradients wrt FOD and seeds equal those without checkpointing (rtol 1e-10)."""
    d = phantom64
    B, T = 6, 20
    pts, dirs = _seeds(d, B, seed=130, min_amp=0.2)
    W = torch.randn(B, 2 * T + 1, 3, generator=torch.Generator().manual_seed(131), dtype=f64)
    out = []
    for ck in (0, 7):
        shv = d["field"].sh.clone().requires_grad_(True)
        s = pts.clone().requires_grad_(True)
        r = track_fixed(d["field"]._replace(sh=shv), d["params"], s, dirs, T, d["mask"], temperature, checkpoint=ck)
        loss = (r.weights.unsqueeze(-1) * r.vertices * W).sum()
        loss.backward()
        out.append((r, shv.grad, s.grad))
    (r0, gs0, gp0), (r1, gs1, gp1) = out
    for a, b in zip(r0, r1):
        assert torch.equal(a, b)
    e_sh, e_s = _rel(gs1, gs0), _rel(gp1, gp0)
    _report(f"checkpoint=7 vs 0 (temperature {temperature}): grad wrt SH volume, seeds (rel)", max(e_sh, e_s))
    assert gs0.abs().sum() > 0
    assert torch.allclose(gs1, gs0, rtol=1e-10, atol=1e-14 * float(gs0.abs().max()))
    assert torch.allclose(gp1, gp0, rtol=1e-10, atol=1e-14 * float(gp0.abs().max()))


# --------------------------------------------------------------------------------------------------
# 6. torch.compile forward and backward


def test_torch_compile_attach_peak_and_tangent_newton_forward_backward():
    """attach_peak (SH jet + IFT graft) and tangent_newton (wrt gradient, Hessian and direction) compiled
    together as one fullgraph inductor graph; forward and backward equal eager to rounding.  lmax 4 keeps
    the graph (and the CPU compile time) small; the code path is the same for every lmax, and the slow
    test below compiles a whole lmax-8 tracking step."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(140)
    c = torch.stack([_lobes([[0.9, 0.3, 0.2], [-0.2, 0.7, 0.6]], [1.0, 0.6], lmax=4), _zonal_z(4)])
    c = torch.cat([c, c[:1] + 0.05 * torch.randn(6, 15, generator=g, dtype=f64)])
    u0 = torch.as_tensor(unit([[0.9, 0.3, 0.2]] + [[0.0, 0.0, 1.0]] + [[0.85, 0.35, 0.2]] * 6))
    p = peak(c, u0, None, polish_iter=4)
    assert torch.isfinite(p.dir).all()
    assert torch.equal(p.dir[1], u0[1])                  # zonal about z: the peak is exactly the pole
    u = torch.nn.functional.normalize(p.dir + 0.05 * torch.randn(8, 3, generator=g, dtype=f64), dim=-1)
    jet = sh.sh_jet(c, u)

    def pieces(c, u_star, amp_star, grad, hess, u):
        q = attach_peak(c, u_star, amp_star)
        return q.dir, q.amp, tangent_newton(grad, hess, u).delta
    args = (c, p.dir, p.amp, jet.grad, jet.hess, u)
    wrt = (0, 3, 4, 5)

    def run(f):
        xs = [a.detach().clone().requires_grad_(i in wrt) for i, a in enumerate(args)]
        out = f(*xs)
        w = torch.Generator().manual_seed(0)
        loss = sum((o * torch.randn(o.shape, generator=w, dtype=f64)).sum() for o in out)
        return [o.detach() for o in out], torch.autograd.grad(loss, [xs[i] for i in wrt])
    out_e, g_e = run(pieces)
    out_c, g_c = run(torch.compile(pieces, fullgraph=True))
    for a, b in zip(out_e, out_c):
        assert torch.allclose(b, a, rtol=1e-12, atol=1e-14)
    errs = [_rel(b, a) for a, b in zip(g_e, g_c)]
    _report("torch.compile(attach_peak + tangent_newton) backward vs eager, max over inputs (rel)", max(errs))
    assert all(torch.isfinite(x).all() for x in g_c)
    assert max(errs) < 1e-12


@pytest.mark.slow
def test_torch_compile_tracking_step_forward_backward(phantom64):
    """The whole step (fixed 50-iteration Newton + polish + IFT) compiled fullgraph: minutes on a CPU."""
    d = phantom64
    pts, dirs = _seeds(d, 8, seed=150, min_amp=0.2)
    B = pts.shape[0]
    p0 = peak(d["field"].sample(pts).values, dirs, None, polish_iter=3).dir

    def f(pos, shv):
        st = TrackState(pos, p0, torch.ones(B, dtype=torch.bool), torch.ones(B, dtype=torch.long),
                        torch.zeros(B, dtype=torch.long))
        new, added = step(st, d["field"]._replace(sh=shv), d["params"], d["mask"])
        return new.pos, new.dir, added
    res = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        pos = pts.clone().requires_grad_(True)
        shv = d["field"].sh.clone().requires_grad_(True)
        npos, ndir, added = fn(pos, shv)
        loss = (npos * torch.arange(3, dtype=f64)).sum() + (ndir ** 2 * torch.arange(B, dtype=f64)[:, None]).sum()
        res.append((npos.detach(), ndir.detach(), added, *torch.autograd.grad(loss, (pos, shv))))
    (pe, de, ae, gpe, gse), (pc, dc, ac, gpc, gsc) = res
    assert torch.equal(ae, ac) and bool(ae.all())
    assert torch.allclose(pc, pe, rtol=0, atol=1e-12) and torch.allclose(dc, de, rtol=0, atol=1e-12)
    _report("torch.compile(step) backward vs eager (rel)", max(_rel(gpc, gpe), _rel(gsc, gse)))
    assert _rel(gpc, gpe) < 1e-10 and _rel(gsc, gse) < 1e-10
