"""tractfunc.sdstream.ops: the fused engine as custom ops of fixed shapes, against track_fixed (the primitives), and
through torch.func (grad, jacrev, vmap) and torch.compile(fullgraph=True)."""
import pytest
import torch

import tractfunc as tf
from tractfunc.core import params as P
from tractfunc.core.field import tracking_field
from tractfunc.sdstream import native
from tractfunc.sdstream.ops import follow_fixed

from conftest import phantom_seeds

pytestmark = pytest.mark.skipif(not native.available()[0], reason="native kernel unavailable (no C compiler)")

T = 12


def _setup(f, rk4=False, n=5, seed=3, exact=True):
    prm = P.resolve(f["img"].voxel_sizes, exact=exact, rk4=rk4, max_length=20.0)
    pts, dirs, fld = phantom_seeds(f, n, seed, torch.float64)
    return tracking_field(fld, prm), prm, pts, dirs / dirs.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("rk4,temperature,exact", [(False, None, True), (False, 0.1, True), (True, None, True),
                                                    (False, None, False), (True, None, False)])
def test_equals_track_fixed(phantom_field, rk4, temperature, exact):
    """follow_fixed is track_fixed computed by the fused engine: the same padded decisions, vertices within 1e-10 mm,
    weights within 1e-12, gradients wrt the FOD, the seeds and the step within 1e-6 relative (measured 1e-15), with
    exact peaks and with tckgen's peak search in double (whose searches start where track_fixed's do).
    (RK4 with soft stopping is compared on the Philips FOD in test_fused.py: the phantom's uniform FOD makes the
    five stage amplitudes tie, where the minimum's subgradient is a choice: torch splits it, the sweep takes the
    first stage.)"""
    f = phantom_field
    fld, prm, pts, dirs = _setup(f, rk4, exact=exact)
    leaves = [(fld.sh.clone().requires_grad_(True), pts.clone().requires_grad_(True),
               torch.tensor(float(prm.step), dtype=torch.float64, requires_grad=True)) for _ in range(2)]
    outs = [fn(fld._replace(sh=sh), prm._replace(step=st), s, dirs, T, f["mask"], temperature)
            for fn, (sh, s, st) in zip((follow_fixed, tf.track_fixed), leaves)]
    a, b = outs
    for name in ("valid", "accepted", "seed_index", "reason_fwd", "reason_bwd"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert int(a.valid.sum()) > 40
    assert float((a.vertices - b.vertices)[a.valid].abs().max()) < 1e-10
    assert float((a.weights - b.weights).abs().max()) < 1e-12
    u = torch.randn(a.vertices.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * a.valid[..., None]
    uw = torch.linspace(0.5, 1.5, a.weights.numel(), dtype=torch.float64).reshape(a.weights.shape)
    grads = [torch.autograd.grad((o.vertices * u).sum() + (o.weights * uw).sum(), lv) for o, lv in zip(outs, leaves)]
    for x, y in zip(*grads):
        assert float(y.norm()) > 0 and float((x - y).norm() / y.norm()) < 1e-6


def test_vmap_jacrev_per_streamline_jacobians(phantom_field):
    """vmap(jacrev(...)) over single-seed calls: each streamline's Jacobian wrt its seed, (S, 2T+1, 3, 3), equal to
    track_fixed's on the valid vertices (the ops' vmap rules: one kernel call for the batch of seeds, one sweep per
    cotangent), and torch.func.grad of a sum equals the Jacobians' sum."""
    f = phantom_field
    fld, prm, pts, dirs = _setup(f)

    def one(fn):
        return lambda s, d: fn(fld, prm, s[None], d[None], T, f["mask"]).vertices[0]

    J = torch.func.vmap(torch.func.jacrev(one(follow_fixed)))(pts, dirs)
    ref = torch.func.vmap(torch.func.jacrev(one(tf.track_fixed)))(pts, dirs)
    valid = follow_fixed(fld, prm, pts, dirs, T, f["mask"]).valid
    assert J.shape == (5, 2 * T + 1, 3, 3)
    assert float(ref[valid].abs().max()) > 0.5 and float((J - ref)[valid].abs().max()) < 1e-10
    g = torch.func.grad(lambda s: follow_fixed(fld, prm, s, dirs, T, f["mask"]).vertices[valid].sum())(pts)
    assert torch.allclose(g, torch.einsum("slij->sj", J * valid[..., None, None]), atol=1e-12)   # torch.func.grad


def test_torch_compile_fullgraph_no_recompiles(phantom_field):
    """torch.compile(fullgraph=True, dynamic=True) traces follow_fixed with no graph break, gives eager's values and
    gradients, and does not recompile for other seed counts (the seed dimension marked dynamic: left to itself
    dynamo specialises the start directions' size on the first call and generalises on the second)."""
    import torch._dynamo
    f = phantom_field
    fld, prm, pts, dirs = _setup(f, n=8, seed=4)

    def loss(sh, s, d):
        ft = follow_fixed(fld._replace(sh=sh), prm, s, d, T, f["mask"], 0.1)
        return (ft.vertices * ft.weights[..., None]).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n in (3, 5, 8):
        sh1, s1 = fld.sh.clone().requires_grad_(True), pts[:n].clone().requires_grad_(True)
        sh2, s2 = fld.sh.clone().requires_grad_(True), pts[:n].clone().requires_grad_(True)
        d = dirs[:n].clone()
        torch._dynamo.mark_dynamic(s1, 0)
        torch._dynamo.mark_dynamic(d, 0)
        out, ref = compiled(sh1, s1, d), loss(sh2, s2, dirs[:n])
        assert torch.allclose(out, ref, rtol=1e-12, atol=0)
        for x, y in zip(torch.autograd.grad(out, (sh1, s1)), torch.autograd.grad(ref, (sh2, s2))):
            assert torch.allclose(x, y, rtol=1e-10, atol=1e-14)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames == 1


@pytest.mark.parametrize("rk4,exact", [(False, True), (True, False)])
def test_jacfwd_wrt_seeds(phantom_field, rk4, exact):
    """Forward mode through the ops wrt the seeds: jacfwd equals jacrev (measured 7e-16) and, for Euler, the
    primitives' Jacobian (track_fixed's jacrev, on the valid vertices, within 1e-10; RK4's reverse mode is compared
    with track_fixed's in test_equals_track_fixed, its jacrev costs 50 s here), also under vmap over single-seed
    calls (the forward-mode op's vmap rule), and a jvp is the Jacobian times the tangent."""
    f = phantom_field
    fld, prm, pts, dirs = _setup(f, rk4, exact=exact)
    fn = lambda s: follow_fixed(fld, prm, s, dirs, T, f["mask"]).vertices   # noqa: E731
    Jf, Jr = torch.func.jacfwd(fn)(pts), torch.func.jacrev(fn)(pts)
    assert Jf.shape == (5, 2 * T + 1, 3, 5, 3) and float(Jr.abs().max()) > 0.5
    assert float((Jf - Jr).abs().max()) < 1e-12
    if not rk4:
        Jt = torch.func.jacrev(lambda s: tf.track_fixed(fld, prm, s, dirs, T, f["mask"]).vertices)(pts)
        valid = follow_fixed(fld, prm, pts, dirs, T, f["mask"]).valid
        assert float((Jf - Jt)[valid].abs().max()) < 1e-10

    def one(s, d):
        return follow_fixed(fld, prm, s[None], d[None], T, f["mask"]).vertices[0]

    Vf, Vr = torch.func.vmap(torch.func.jacfwd(one))(pts, dirs), torch.func.vmap(torch.func.jacrev(one))(pts, dirs)
    assert float((Vf - Vr).abs().max()) < 1e-12
    _, t = torch.func.jvp(fn, (pts,), (torch.ones_like(pts),))
    assert torch.allclose(t, torch.einsum("slisj->sli", Jr), atol=1e-12)


@pytest.mark.parametrize("rk4,temperature,exact", [(False, None, True), (False, 0.1, True), (True, None, False),
                                                    (True, 0.1, True)])
def test_jvp_wrt_fod_and_step_is_the_transpose_of_the_vjp(phantom_field, rk4, temperature, exact):
    """Forward mode wrt the FOD and the step (hard and soft stopping): for random tangents v and cotangents u,
    <u, J v> from jvp equals <J^T u, v> from vjp (within 1e-10 relative); jacfwd wrt the step equals jacrev."""
    f = phantom_field
    fld, prm, pts, dirs = _setup(f, rk4, exact=exact)
    step = torch.tensor(float(prm.step), dtype=torch.float64)

    def fn(sh, st):
        o = follow_fixed(fld._replace(sh=sh), prm._replace(step=st), pts, dirs, T, f["mask"], temperature)
        return o.vertices, o.weights

    g = torch.Generator().manual_seed(4)
    v_sh = torch.randn(fld.sh.shape, dtype=torch.float64, generator=g) * (fld.sh != 0)
    v_st = torch.tensor(0.7, dtype=torch.float64)
    (verts, weights), (tv, tw) = torch.func.jvp(fn, (fld.sh, step), (v_sh, v_st))
    valid = follow_fixed(fld, prm, pts, dirs, T, f["mask"], temperature).valid
    u = torch.randn(verts.shape, dtype=torch.float64, generator=g) * valid[..., None]
    uw = torch.randn(weights.shape, dtype=torch.float64, generator=g) * valid * (temperature is not None)
    _, pull = torch.func.vjp(fn, fld.sh, step)
    g_sh, g_st = pull((u, uw))
    lhs = float((u * tv).sum() + (uw * tw).sum())
    rhs = float((g_sh * v_sh).sum() + g_st * v_st)
    assert abs(rhs) > 1e-3 and abs(lhs - rhs) < 1e-10 * max(1.0, abs(rhs)), (lhs, rhs)
    if temperature is not None:
        assert float(tw.abs().max()) > 0
    jf = torch.func.jacfwd(lambda st: fn(fld.sh, st)[0])(step)
    jr = torch.func.jacrev(lambda st: fn(fld.sh, st)[0])(step)
    assert float((jf - jr).abs().max()) < 1e-12 and float(jr.abs().max()) > 0.1
