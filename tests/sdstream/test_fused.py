"""tractfunc.sdstream.fused: the follow engine's C forward and reverse sweep against its specification, the
PyTorch primitives composed step by step (tractfunc.sdstream.follow.follow), and against central differences."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import tractfunc as tf
from tractfunc.core import params as P
from tractfunc.core.field import tracking_field
from tractfunc.sdstream import engine as E, fused, native
from tractfunc.sdstream.follow import follow
from tractfunc.sdstream.track import decision_kernel, track

from conftest import phantom_seeds, require_philips

pytestmark = pytest.mark.skipif(not native.available()[0], reason="native kernel unavailable (no C compiler)")


def _leaves(fld, prm, pts):
    sh = fld.sh.detach().clone().requires_grad_(True)
    seeds = pts.detach().clone().requires_grad_(True)
    step = torch.tensor(float(prm.step), dtype=fld.sh.dtype, requires_grad=True)
    return fld._replace(sh=sh), prm._replace(step=step), seeds, (sh, seeds, step)


def _reference(fld, prm, pts, dirs, mask=None):
    """The PyTorch follow engine (the primitives, step by step) on the kernel's decisions: (Tracks-like vertices,
    lengths, seed_index, leaves)."""
    fld = tracking_field(fld, prm)
    f, p, s, leaves = _leaves(fld, prm, pts)
    k = decision_kernel(fld, prm, mask)
    s32, d32 = pts.float().numpy(), dirs.float().numpy()
    v, ln, ids, si, _, _ = (torch.from_numpy(x) for x in k.track(s32, d32))
    seed_peak = None
    if prm.rk4:
        seed_peak = torch.from_numpy(k.seed_steps(s32[ids.numpy()], d32[ids.numpy()])[0]).to(pts.dtype)
    fol = follow(f, p, s[ids], v, ln, si, seed_peak)
    assert bool(fol.faithful.all())
    return fol.vertices, ln, si, leaves


def _fused(fld, prm, pts, dirs, mask=None, **kw):
    f, p, s, leaves = _leaves(fld, prm, pts)
    tr = track(f, p, s, dirs, mask=mask, engine="follow", **kw)
    return tr, leaves


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _same_gradients(got_v, leaves, ref_v, ref_leaves, seed):
    """Gradients of a random projection of the vertices wrt each leaf within 1e-6 relative of the reference's."""
    u = torch.randn(ref_v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    got = torch.autograd.grad((got_v * u).sum(), leaves)
    want = torch.autograd.grad((ref_v * u).sum(), ref_leaves)
    for g, w in zip(got, want):
        assert float(w.norm()) > 0 and _rel(g, w) < 1e-6, _rel(g, w)


@pytest.mark.parametrize("rk4", [False, True])
def test_matches_the_primitives_float64_exact_peaks(phantom_field, rk4):
    """Exact peaks in float64: the same decisions, vertices within 1e-10 mm and gradients wrt the FOD, the seeds
    and the step within 1e-6 relative of the PyTorch primitives' autograd (measured: 1e-14 mm, 2e-15)."""
    f = phantom_field
    prm = P.resolve(f["img"].voxel_sizes, exact=True, rk4=rk4, max_length=25.0)   # short: the reference is slow
    pts, dirs, fld = phantom_seeds(f, 10, 11, torch.float64)
    ref_v, ln, si, ref_leaves = _reference(fld, prm, pts, dirs, f["mask"])
    tr, leaves = _fused(fld, prm, pts, dirs, f["mask"])
    assert torch.equal(tr.lengths, ln) and torch.equal(tr.seed_index, si)
    assert tr.vertices.dtype == torch.float64 and tr.vertices.shape[0] > 150
    assert float((tr.vertices.detach() - ref_v.detach()).norm(dim=-1).max()) < 1e-10
    _same_gradients(tr.vertices, leaves, ref_v, ref_leaves, 2)


def test_central_differences_float64(phantom_field):
    """Fused gradients wrt a seed, the step and FOD coefficients against central differences of the fused
    forward itself (the decisions held: the perturbation keeps every vertex count)."""
    f = phantom_field
    prm = P.resolve(f["img"].voxel_sizes, exact=True)
    pts, dirs, fld = phantom_seeds(f, 6, 4, torch.float64)
    fld = tracking_field(fld, prm)
    u = torch.tensor([0.3, -0.5, 0.81], dtype=torch.float64)

    def loss(sh, seeds, step):
        tr = track(fld._replace(sh=sh), prm._replace(step=step), seeds, dirs, engine="follow")
        return (tr.vertices @ u).sum(), tr.lengths

    tr, (sh, seeds, step) = _fused(fld, prm, pts, dirs)
    g_sh, g_seeds, g_step = torch.autograd.grad((tr.vertices @ u).sum(), (sh, seeds, step))
    eps = 1e-6

    def central(make):
        (lp, np_), (lm, nm) = loss(*make(eps)), loss(*make(-eps))
        assert torch.equal(np_, tr.lengths) and torch.equal(nm, tr.lengths)
        return float(lp - lm) / (2 * eps)

    base = (fld.sh.detach(), pts, torch.tensor(float(prm.step), dtype=torch.float64))
    fd = central(lambda e: (base[0], base[1] + e * torch.eye(3, dtype=torch.float64)[1].expand(6, 3) *
                            (torch.arange(6) == 0).unsqueeze(1), base[2]))
    assert abs(fd - float(g_seeds[0, 1])) < 1e-6 * max(1.0, abs(fd))
    fd = central(lambda e: (base[0], base[1], base[2] + e))
    assert abs(fd - float(g_step)) < 1e-6 * max(1.0, abs(fd))
    flat = g_sh.reshape(-1, g_sh.shape[-1])
    vox = int(flat.abs().sum(1).argmax())            # the voxel with the largest FOD gradient
    for k in flat[vox].abs().argsort(descending=True)[:3].tolist():   # its three largest coefficients
        bump = torch.zeros_like(flat)
        bump[vox, k] = 1.0
        bump = bump.reshape(g_sh.shape)
        fd = central(lambda e: (base[0] + e * bump, base[1], base[2]))
        assert float(flat[vox, k]) != 0.0
        assert abs(fd - float(flat[vox, k])) < 1e-6 * max(1.0, abs(fd)), (k, fd, float(flat[vox, k]))


@pytest.mark.parametrize("rk4", [False, True])
def test_float32_tckgen_settings(phantom_field, rk4):
    """tckgen's settings in float32: the vertices are the native kernel's bit for bit, with a gradient; it agrees
    with the PyTorch follow engine's, whose float32 peaks stop at tckgen's Newton tolerance from other starts
    (measured 2e-4 relative for Euler, 2e-6 for RK4)."""
    f = phantom_field
    prm = P.resolve(f["img"].voxel_sizes, rk4=rk4, max_length=25.0)
    pts, dirs, fld = phantom_seeds(f, 12, 7)
    nat = track(fld, prm, pts, dirs, mask=f["mask"], engine="native")
    tr, leaves = _fused(fld, prm, pts, dirs, f["mask"])
    assert torch.equal(tr.vertices.detach(), nat.vertices) and torch.equal(tr.lengths, nat.lengths)
    assert tr.vertices.requires_grad
    ref_v, _, _, ref_leaves = _reference(fld, prm, pts, dirs, f["mask"])
    u = torch.randn(ref_v.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((tr.vertices * u).sum(), leaves)
    want = torch.autograd.grad((ref_v * u).sum(), ref_leaves)
    for g, w in zip(got, want):
        assert _rel(g, w) < 2e-3, _rel(g, w)


def test_float32_exact_peaks_are_the_float64_values_rounded(phantom_field):
    """Exact peaks in float32: within 1e-5 mm of the float64 primitives (measured 2e-6: float32 rounding at 50 mm),
    since the replay runs in double; the float32 primitives themselves drift 1.3e-4 mm from them."""
    f = phantom_field
    prm = P.resolve(f["img"].voxel_sizes, exact=True, max_length=25.0)
    pts, dirs, fld = phantom_seeds(f, 10, 5)
    ref_v, ln, _, _ = _reference(f["field64"], prm, pts.double(), dirs.double(), f["mask"])
    tr, _ = _fused(fld, prm, pts, dirs, f["mask"])
    assert tr.vertices.dtype == torch.float32 and torch.equal(tr.lengths, ln)
    assert float((tr.vertices.detach().double() - ref_v.detach()).norm(dim=-1).max()) < 1e-5


def test_front_door_picks_it_for_gradients(phantom_field):
    """``engine="auto"`` runs the fused follow engine for a differentiable CPU run; under torch.func transforms
    it cannot (the kernel is not traced) and the rule says so."""
    f = phantom_field
    prm = P.resolve(f["img"].voxel_sizes, exact=True)
    pts, dirs, fld = phantom_seeds(f, 3, 2, torch.float64)
    job = E.describe(fld, prm, pts.requires_grad_(True))
    assert E.choose(job) == "follow" and fused.applies(fld, prm)
    assert E.choose(job._replace(traced=True)) == "eager"
    with pytest.raises(tf.TractfuncError, match="vmap"):
        E.choose(job._replace(traced=True), "follow")
    lut = P.resolve(f["img"].voxel_sizes)   # float64 with tckgen's peaks: fused, unless the state is float32
    assert fused.applies(fld, lut) and E.fused_fits(E.describe(fld, lut, pts))
    narrow = lut._replace(state_dtype=torch.float32)
    assert not fused.applies(fld, narrow) and not E.fused_fits(E.describe(fld, narrow, pts))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(-0.6, 1.6), st.floats(-0.6, 1.6), st.floats(-0.6, 1.6)), min_size=1,
                max_size=6),
       st.sampled_from([(0.0, 0.0, 1.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0), (0.3, -0.2, 0.9)]),
       st.sampled_from(["as is", "flat", "scaled"]), st.booleans(), st.sampled_from([None, 1e-3, 0.2]))
def test_gradients_finite_everywhere(phantom_field, where, start, fod, rk4, temperature):
    """Seeds anywhere in and around the image (faces, edges, outside: dead seeds), starts at the poles, a flat
    (isotropic) FOD and a rescaled one, hard and soft stopping (cold and warm): no NaN or Inf in any gradient."""
    f = phantom_field
    prm = P.resolve(f["img"].voxel_sizes, exact=True, rk4=rk4)
    fld = f["field64"]
    if fod == "flat":
        fld = fld._replace(sh=fld.sh * (torch.arange(fld.sh.shape[-1]) == 0))
    elif fod == "scaled":
        fld = fld._replace(sh=fld.sh * 0.35)
    dims = torch.tensor(fld.sh.shape[:3], dtype=torch.float64)
    A = torch.linalg.inv(fld.world_to_voxel)
    vox = torch.tensor(where, dtype=torch.float64) * (dims - 1)
    pts = vox @ A[:3, :3].T + A[:3, 3]
    dirs = torch.tensor(start, dtype=torch.float64).expand_as(pts)
    soft = dict(stopping=tf.Soft(temperature), n_steps=30) if temperature else {}
    tr, leaves = _fused(fld, prm, pts, dirs, **soft)
    if tr.vertices.shape[0] == 0:
        return
    loss = tr.vertices.sum() + (tr.weights.sum() if temperature else 0.0)
    assert not temperature or bool(torch.isfinite(tr.weights).all())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    for g in grads:
        assert g is None or bool(torch.isfinite(g).all())


@pytest.fixture(scope="module")
def philips():
    d = require_philips()
    from tractfunc import io
    from tractfunc.core import seeds as S
    img = io.load_fod(d["fod"])
    wm = io.load_mask(d["seed"])
    g = torch.Generator().manual_seed(5)
    pts = S.random_in_mask(torch.as_tensor(wm.data), wm.affine, 6, g).float()
    dirs = S.random_directions(6, g, torch.float32)
    fields = {dt: tf.make_field(torch.as_tensor(np.ascontiguousarray(img.data), dtype=dt), img.affine,
                                voxel_sizes=img.voxel_sizes) for dt in (torch.float32, torch.float64)}
    return img, fields, pts, dirs


@pytest.mark.parametrize("rk4", [False, True])
def test_float64_tckgen_peaks_match_the_primitives(philips, rk4):
    """float64 with tckgen's lookup-table peak search (the default settings, ``--dtype float64``), Philips FOD: the
    fused replay against the PyTorch follow engine: same decisions, vertices within 1e-10 mm, gradients wrt the
    FOD, the seeds and the step within 1e-6 relative (measured 2e-14 mm and 5e-13)."""
    img, fields, pts, dirs = philips
    pts, dirs, fld = pts.double(), dirs.double(), fields[torch.float64]
    prm = P.resolve(img.voxel_sizes, rk4=rk4, max_length=40.0)
    ref_v, ln, si, ref_leaves = _reference(fld, prm, pts, dirs)
    tr, leaves = _fused(fld, prm, pts, dirs)
    assert torch.equal(tr.lengths, ln) and torch.equal(tr.seed_index, si) and ln.sum() > 100
    assert float((tr.vertices.detach() - ref_v.detach()).norm(dim=-1).max()) < 1e-10
    _same_gradients(tr.vertices, leaves, ref_v, ref_leaves, 6)


def test_real_data_float64_and_float32(philips):
    """Philips FOD, WM-mask seeds: the fused engine against the PyTorch primitives, Euler, exact peaks: same
    decisions, vertices within 1e-10 mm (float64), gradients within 1e-6 relative."""
    img, fields, pts, dirs = philips
    pts, dirs, fld = pts.double(), dirs.double(), fields[torch.float64]
    prm = P.resolve(img.voxel_sizes, exact=True, max_length=40.0)
    ref_v, ln, _, ref_leaves = _reference(fld, prm, pts, dirs)
    tr, leaves = _fused(fld, prm, pts, dirs)
    assert torch.equal(tr.lengths, ln) and ln.sum() > 150
    assert float((tr.vertices.detach() - ref_v.detach()).norm(dim=-1).max()) < 1e-10
    _same_gradients(tr.vertices, leaves, ref_v, ref_leaves, 6)


@pytest.mark.parametrize("rk4", [False, True])
def test_seed_jacobian_packed_equals_reverse_mode(phantom_field, rk4):
    """The C forward-mode seed Jacobians (one 3 x 3 per vertex) equal the reverse-mode Jacobian of the fused
    engine's vertices with respect to the seeds, and the fixed engine's forward-mode ones where the decisions agree
    (measured 3e-15)."""
    f = phantom_field
    prm = P.resolve(f["img"].voxel_sizes, exact=True, rk4=rk4, max_length=15.0)
    pts, dirs, fld = phantom_seeds(f, 5, 13, torch.float64)
    tr, J = tf.seed_jacobian_packed(fld, prm, pts, dirs)
    full = torch.autograd.functional.jacobian(lambda x: track(fld, prm, x, dirs, engine="follow").vertices, pts)
    rows = torch.arange(tr.vertices.shape[0])
    want = full[rows, :, torch.repeat_interleave(tr.seed_ids, tr.lengths), :]
    assert J.shape == (tr.vertices.shape[0], 3, 3) and float(want.abs().max()) > 0.5
    assert float((J - want).abs().max()) < 1e-10
    seed_rows = torch.cumsum(tr.lengths, 0) - tr.lengths + tr.seed_index
    assert torch.equal(J[seed_rows], torch.eye(3, dtype=J.dtype).expand(len(seed_rows), 3, 3))


def test_torch_func_grad_and_vjp_run_the_fused_engine(phantom_field):
    """``torch.func.grad`` and ``vjp`` go through the fused engine (the op unwraps to plain tensors) and give
    plain autograd's gradients exactly; ``jacrev`` (vmap) runs a fixed-shape engine instead."""
    f = phantom_field
    prm = P.resolve(f["img"].voxel_sizes, exact=True, max_length=15.0)
    pts, dirs, fld = phantom_seeds(f, 5, 17, torch.float64)
    u = torch.tensor([0.3, -0.5, 0.81], dtype=torch.float64)
    engines = []

    def loss(sh, x):
        tr = track(fld._replace(sh=sh), prm, x, dirs)
        engines.append(tr.engine)
        return (tr.vertices @ u).sum()

    g_func = torch.func.grad(loss, argnums=(0, 1))(fld.sh, pts)
    sh, x = fld.sh.clone().requires_grad_(True), pts.clone().requires_grad_(True)
    g_auto = torch.autograd.grad(loss(sh, x), (sh, x))
    assert engines == ["follow", "follow"]
    for a, b in zip(g_func, g_auto):
        assert torch.equal(a, b) and float(b.abs().sum()) > 0
    out, vjp = torch.func.vjp(lambda s: track(fld, prm, s, dirs).vertices, pts)
    (g_vjp,) = vjp(u.expand_as(out))
    assert torch.equal(g_vjp, g_auto[1])
    J = torch.func.jacrev(lambda s: track(fld, prm, s, dirs[:2], n_steps=4).vertices)(pts[:2])
    assert J.shape[1:] == (3, 2, 3) and bool(torch.isfinite(J).all())


# ------------------------------------------------------------------------------------------------------------------
# Soft stopping in the fused engine: against the fixed engine (the primitives with survival weights)

@pytest.mark.parametrize("rk4,n,steps,exact", [(False, 3, 24, True), (True, 2, 12, True), (False, 3, 24, False),
                                                (True, 2, 12, False)])
def test_soft_stopping_matches_the_fixed_engine_float64(philips, rk4, n, steps, exact):
    """Soft stopping, float64, exact peaks or tckgen's peak search, Philips FOD: the fused engine takes the fixed
    engine's decisions, vertices within 1e-10 mm, weights within 1e-12, and gradients of a loss on vertices and
    weights wrt the FOD, the seeds and the step within 1e-6 relative (measured 7e-15 mm, 4e-16, 1e-13)."""
    img, fields, pts, dirs = philips
    prm = P.resolve(img.voxel_sizes, exact=exact, rk4=rk4, max_length=30.0)
    fld = tracking_field(fields[torch.float64], prm)
    pts, dirs = pts[:n].double(), dirs[:n].double()
    tr, leaves = _fused(fld, prm, pts, dirs, stopping=tf.Soft(0.1), n_steps=steps)
    f, p, s, ref_leaves = _leaves(fld, prm, pts)
    ref = tf.track_fixed(f, p, s, dirs, steps, temperature=0.1).to_tracks(True)
    assert tr.engine == "follow" and torch.equal(tr.lengths, ref.lengths) and torch.equal(tr.seed_index,
                                                                                          ref.seed_index)
    assert float((tr.vertices - ref.vertices).abs().max()) < 1e-10
    assert float((tr.weights - ref.weights).abs().max()) < 1e-12 and float(ref.weights.min()) < 0.5
    g = torch.Generator().manual_seed(1)
    u = torch.randn(ref.vertices.shape, dtype=torch.float64, generator=g)
    uw = torch.randn(ref.weights.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((tr.vertices * u).sum() + (tr.weights * uw).sum(), leaves)
    want = torch.autograd.grad((ref.vertices * u).sum() + (ref.weights * uw).sum(), ref_leaves)
    for a, b in zip(got, want):
        assert float(b.norm()) > 0 and _rel(a, b) < 1e-6, _rel(a, b)


def test_soft_weights_central_differences(philips):
    """The fused soft weights' gradient wrt a seed and the three largest FOD coefficients of the most sensitive
    voxel against central differences of the fused forward (decisions held), float64."""
    img, fields, pts, dirs = philips
    prm = P.resolve(img.voxel_sizes, exact=True, max_length=30.0)
    fld = tracking_field(fields[torch.float64], prm)
    pts, dirs = pts[:3].double(), dirs[:3].double()
    kw = dict(engine="follow", stopping=tf.Soft(0.1), n_steps=30)

    def loss(sh, seeds):
        tr = track(fld._replace(sh=sh), prm, seeds, dirs, **kw)
        return float((tr.weights * torch.linspace(0.5, 1.5, tr.weights.shape[0], dtype=torch.float64)).sum()), \
            tr.lengths

    sh, seeds = fld.sh.detach().clone().requires_grad_(True), pts.clone().requires_grad_(True)
    tr = track(fld._replace(sh=sh), prm, seeds, dirs, **kw)
    lw = (tr.weights * torch.linspace(0.5, 1.5, tr.weights.shape[0], dtype=torch.float64)).sum()
    g_sh, g_seeds = torch.autograd.grad(lw, (sh, seeds))
    eps = 1e-6

    def central(a, b):
        (lp, np_), (lm, nm) = loss(*a), loss(*b)
        assert torch.equal(np_, tr.lengths) and torch.equal(nm, tr.lengths)
        return (lp - lm) / (2 * eps)

    e = torch.zeros_like(pts)
    e[0, 2] = eps
    base = fld.sh.detach()
    fd = central((base, pts + e), (base, pts - e))
    assert abs(fd - float(g_seeds[0, 2])) < 1e-5 * max(1.0, abs(fd)), (fd, float(g_seeds[0, 2]))
    flat = g_sh.reshape(-1, g_sh.shape[-1])
    vox = int(flat.abs().sum(1).argmax())
    for k in flat[vox].abs().argsort(descending=True)[:3].tolist():
        bump = torch.zeros_like(flat)
        bump[vox, k] = eps
        bump = bump.reshape(g_sh.shape)
        fd = central((base + bump, pts), (base - bump, pts))
        assert float(flat[vox, k]) != 0.0
        assert abs(fd - float(flat[vox, k])) < 1e-5 * max(1.0, abs(fd)), (k, fd, float(flat[vox, k]))


@pytest.mark.parametrize("rk4", [False, True])
def test_soft_float32_tckgen_settings(philips, rk4):
    """Soft stopping with tckgen's settings in float32: the fixed engine's decisions, vertices within 1e-5 mm and
    weights within 1e-5 of it (measured 4e-6 and 5e-7); Euler's gradients wrt the FOD and the seeds within 1e-4
    relative (measured 1e-5; the fixed engine's float32 RK4 backward is too slow for the default run, and RK4's
    adjoint is checked in float64 above)."""
    img, fields, pts, dirs = philips
    prm = P.resolve(img.voxel_sizes, rk4=rk4, max_length=30.0)
    fld = tracking_field(fields[torch.float32], prm)
    pts, dirs = pts[:4], dirs[:4]
    sh, seeds = fld.sh.detach().clone().requires_grad_(True), pts.clone().requires_grad_(not rk4)
    tr = track(fld._replace(sh=sh), prm, seeds, dirs, engine="follow", stopping=tf.Soft(0.1), n_steps=20)
    sh_r, seeds_r = fld.sh.detach().clone().requires_grad_(not rk4), pts.clone().requires_grad_(not rk4)
    ref = tf.track_fixed(fld._replace(sh=sh_r), prm, seeds_r, dirs, 20, temperature=0.1).to_tracks(True)
    assert tr.engine == "follow" and tr.weights.requires_grad
    assert torch.equal(tr.lengths, ref.lengths) and torch.equal(tr.seed_index, ref.seed_index)
    assert float((tr.vertices - ref.vertices).abs().max()) < 1e-5
    assert float((tr.weights - ref.weights).abs().max()) < 1e-5
    if rk4:
        return
    uw = torch.linspace(-1.0, 1.0, ref.weights.shape[0])
    got = torch.autograd.grad((tr.weights * uw).sum() + tr.vertices.sum(), (sh, seeds))
    want = torch.autograd.grad((ref.weights * uw).sum() + ref.vertices.sum(), (sh_r, seeds_r))
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-4, _rel(a, b)


def test_soft_stopping_tends_to_hard(philips):
    """As the temperature goes to 0 the soft streamline's weighted part is the hard one: with T = 1e-6 the vertices
    of weight > 1/2 are the native kernel's hard streamline bit for bit (float32, tckgen's settings, 300 seeds)."""
    img, fields, _, _ = philips
    from tractfunc.core import seeds as S
    from tractfunc import io
    wm = io.load_mask(require_philips()["seed"])
    g = torch.Generator().manual_seed(11)
    pts = S.random_in_mask(torch.as_tensor(wm.data), wm.affine, 300, g).float()
    dirs = S.random_directions(300, g, torch.float32)
    prm = P.resolve(img.voxel_sizes)
    fld = fields[torch.float32]
    hard = track(fld, prm, pts, dirs, engine="native")
    cold = track(fld, prm, pts, dirs, engine="follow", stopping=tf.Soft(1e-6))
    common = hard.accepted & cold.accepted
    assert int(common.sum()) > 200
    hs = dict(zip(hard.seed_ids.tolist(), hard.streamlines()))
    ws = torch.split(cold.weights, cold.lengths.tolist())
    checked = 0
    for sid, c, w in zip(cold.seed_ids.tolist(), cold.streamlines(), ws):
        if sid in hs:
            assert torch.equal(c[w > 0.5], hs[sid])
            checked += 1
    assert checked == int(common.sum())
    assert float(cold.weights.min()) < 1e-3   # the soft streamlines run on past the hard ends, weightless


@pytest.mark.parametrize("dtype,rk4,soft,total,beyond", [
    (torch.float32, False, False, 24, 12), (torch.float64, False, False, 48, 24), (torch.float64, False, True, 72, 40),
    (torch.float64, True, False, 96, 72), (torch.float64, True, True, 128, 96)])
def test_saved_bytes_per_vertex(phantom_field, dtype, rk4, soft, total, beyond):
    """What the fused forward keeps for backward, per vertex, tckgen's settings: the vertices, the step records (RK4's
    packed in double) and the weights; beyond the returned tensors (one chunk of seeds shares their memory) at most
    100 bytes (issue 15)."""
    f = phantom_field
    prm = P.resolve(f["img"].voxel_sizes, rk4=rk4, max_length=15.0)
    pts, dirs, fld = phantom_seeds(f, 6, 3, dtype)
    sh = fld.sh.detach().clone().requires_grad_(True)
    kw = dict(stopping=tf.Soft(0.1), n_steps=20) if soft else {}
    tr = track(fld._replace(sh=sh), prm, pts, dirs, mask=f["mask"], **kw)
    V = tr.vertices.shape[0]
    assert tr.engine == "follow" and V > 30
    got = fused.saved_bytes(tr.vertices, tr.weights)
    assert (got[0] / V, got[1] / V) == (total, beyond) and beyond <= 100
    assert fused.saved_bytes(track(fld, prm, pts, dirs, mask=f["mask"], engine="follow").vertices) is None


def test_rk4_halves_cut_by_n_steps_start_along_the_seed_peak(phantom_field):
    """A two-sided RK4 streamline whose half is cut by ``n_steps`` ends that half with CONTINUE, as a unidirectional
    one does: both follow routes take the seed peak's sign from the kernel's record, so the PyTorch route (float32
    state) and the fused one (float64 state) give the same streamlines within the state's rounding."""
    f = phantom_field
    pts, dirs, fld = phantom_seeds(f, 6, 9, torch.float64)
    prm = P.resolve(f["img"].voxel_sizes, rk4=True)
    a = track(fld, prm._replace(state_dtype=torch.float32), pts, dirs, mask=f["mask"], engine="follow", n_steps=3)
    b = track(fld, prm, pts, dirs, mask=f["mask"], engine="follow", n_steps=3)
    assert torch.equal(a.lengths, b.lengths) and int((a.reasons == 0).sum()) > 0
    assert float((a.vertices - b.vertices).norm(dim=-1).max()) < 1e-4


def test_degenerate_start_direction_does_not_crash(phantom_field):
    """A zero start direction with tckgen's peak search replayed in double (soft stopping searches the seed peak
    again from it): no crash, finite or NaN values only where the search had no direction, and a warning."""
    f = phantom_field
    pts, dirs, fld = phantom_seeds(f, 3, 4, torch.float64)
    dirs = dirs.clone()
    dirs[1] = 0.0
    prm = P.resolve(f["img"].voxel_sizes)
    with pytest.warns(UserWarning):
        tr = track(fld, prm, pts, dirs, mask=f["mask"], engine="follow", stopping=tf.Soft(0.1), n_steps=5)
    ok = tr.seed_ids != 1
    assert bool(torch.isfinite(tr.weights[torch.repeat_interleave(ok, tr.lengths)]).all())


@pytest.mark.parametrize("rk4,soft", [(False, False), (True, True)])
def test_torch_func_jvp_through_the_front_door(phantom_field, rk4, soft):
    """``torch.func.jvp`` of ``tf.track`` runs the fused engine's C forward mode: wrt the seeds it equals the
    Jacobian (autograd) times the tangent; wrt the FOD and the step, <u, J v> equals the vjp's <J^T u, v>."""
    f = phantom_field
    prm = P.resolve(f["img"].voxel_sizes, exact=True, rk4=rk4, max_length=15.0)
    pts, dirs, fld = phantom_seeds(f, 5, 21, torch.float64)
    fld = tracking_field(fld, prm)
    kw = dict(mask=f["mask"], engine="follow", **(dict(stopping=tf.Soft(0.1), n_steps=20) if soft else {}))
    step = torch.tensor(float(prm.step), dtype=torch.float64)

    def fn(sh, s, st):
        tr = track(fld._replace(sh=sh), prm._replace(step=st), s, dirs, **kw)
        return tr.vertices, (tr.weights if soft else tr.vertices[:, 0] * 0)

    g = torch.Generator().manual_seed(8)
    v_s = torch.randn(pts.shape, dtype=torch.float64, generator=g)
    _, (tv, _) = torch.func.jvp(lambda s: fn(fld.sh, s, step), (pts,), (v_s,))
    J = torch.autograd.functional.jacobian(lambda s: fn(fld.sh, s, step)[0], pts)
    assert float(J.abs().max()) > 0.5 and float((tv - torch.einsum("visj,sj->vi", J, v_s)).abs().max()) < 1e-12
    v_sh = torch.randn(fld.sh.shape, dtype=torch.float64, generator=g) * (fld.sh != 0)
    v_st = torch.tensor(-0.4, dtype=torch.float64)
    (verts, w), (tv, tw) = torch.func.jvp(lambda sh, st: fn(sh, pts, st), (fld.sh, step), (v_sh, v_st))
    u, uw = torch.randn(verts.shape, dtype=torch.float64, generator=g), torch.randn(w.shape, dtype=torch.float64,
                                                                                    generator=g)
    _, pull = torch.func.vjp(lambda sh, st: fn(sh, pts, st), fld.sh, step)
    g_sh, g_st = pull((u, uw))
    lhs, rhs = float((u * tv).sum() + (uw * tw).sum()), float((g_sh * v_sh).sum() + g_st * v_st)
    assert abs(rhs) > 1e-3 and abs(lhs - rhs) < 1e-10 * max(1.0, abs(rhs)), (lhs, rhs)
