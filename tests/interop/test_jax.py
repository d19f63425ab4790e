"""DLPack inputs (NumPy, JAX) at the public boundary, and the JAX front end :mod:`tractfunc.interop.jax`.

* NumPy and JAX arrays reach torch without a copy (same buffer address), the public functions accept
  them and give the tensor results, and tracking leaves its (read-only) inputs untouched;
* every :mod:`tractfunc.interop.jax` wrapper returns torch's values and its ``jax.grad`` equals torch autograd's
  gradient of the same loss (float64, rel 1e-10), eagerly and under ``jax.jit``, including a whole
  fixed-length tracking loss wrt seeds and the FOD coefficients.

jax is part of the ``test`` extra: where it is missing the JAX tests skip (fail with CI=true).
"""
import warnings

import numpy as np
import pytest
import torch

import tractfunc as tf
from tractfunc.core import newton as direction, integrate, interpolate, sh, stop
from tractfunc.core.arrays import as_tensor
from tractfunc.errors import TractfuncError

from conftest import _missing, phantom_seeds

try:
    import jax
    import jax.numpy as jnp
except ImportError:
    jax = jnp = None

f64 = torch.float64
RTOL = 1e-10


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tfj():
    """tractfunc.interop.jax with float64 enabled in JAX for this module (restored afterwards)."""
    if jax is None:
        _missing("jax is not installed: pip install 'tractfunc[jax]'")
    import tractfunc.interop.jax as module
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield module
    jax.config.update("jax_enable_x64", old)


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.nanmax(np.abs(b)))))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _rng(seed):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------------
# NumPy and DLPack at the public boundary


def test_as_tensor_shares_memory_and_copies_only_what_torch_cannot_view():
    a = _rng(0).standard_normal((5, 3))
    ro = a.copy()
    ro.flags.writeable = False
    t = torch.ones(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # from_numpy warns on read-only arrays; the DLPack route does not
        for x in (a, ro, a[:, 1:]):
            y = as_tensor(x)
            assert y.data_ptr() == x.ctypes.data and np.array_equal(y.numpy(), x)
        assert as_tensor(t) is t
        for x in (a[::-1], a.astype(">f8"), np.float64(2.5), [[1.0, 2.0]]):   # negative strides, big-endian
            assert np.array_equal(as_tensor(x).numpy(), np.asarray(x))
        assert as_tensor(a.astype(">f4")).dtype == torch.float32


def test_public_functions_accept_numpy_and_leave_inputs_untouched(phantom_field):
    g = _rng(1)
    c, u = g.standard_normal((7, 45)), _unit(g.standard_normal((7, 3)))
    tc, tu = torch.from_numpy(c), torch.from_numpy(u)
    assert torch.equal(sh.amplitude(c, u), sh.amplitude(tc, tu))
    assert torch.equal(sh.basis(u, 8), sh.basis(tu, 8))
    assert torch.equal(sh.sh_jet(c, u).hess, sh.sh_jet(tc, tu).hess)
    assert all(torch.equal(a, b) for a, b in zip(direction.peak(c, u), direction.peak(tc, tu)))
    vol, vox = g.standard_normal((4, 5, 6, 2)), g.uniform(-0.4, 3.4, (9, 3))
    assert all(torch.equal(a, b) for a, b in zip(interpolate.trilinear(vol, vox),
                                                  interpolate.trilinear(torch.from_numpy(vol), torch.from_numpy(vox))))
    assert torch.equal(stop.too_curved(u, u[::-1], 0.5), stop.too_curved(tu, tu.flip(0), 0.5))
    ph = phantom_field["ph"]
    fod = ph.fod.astype(np.float64)
    field = tf.make_field(fod, ph.affine, precomputed=False)
    assert field.sh.data_ptr() == fod.ctypes.data           # the FOD volume is not copied
    pts, dirs, _ = phantom_seeds(phantom_field, 8, seed=3, dtype=f64)
    p, d = pts.numpy().copy(), dirs.numpy().copy()
    p.flags.writeable = d.flags.writeable = False
    params = tf.resolve([2, 2, 2], max_length=20.0)   # short streamlines: a quick test
    ref = tf.track_fixed(field, params, pts, dirs, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tf.track_fixed(field, params, p, d, 6)
        trk = tf.track(field, params, p, d, engine="eager")
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert trk.accepted.sum() > 0 and np.array_equal(p, pts.numpy()) and np.array_equal(d, dirs.numpy())
    assert np.array_equal(fod, ph.fod.astype(np.float64))
    m = integrate.euler(field, params, p[:3], d[:3])
    assert torch.equal(m.pos, integrate.euler(field, params, pts[:3], dirs[:3]).pos)


def test_jax_arrays_reach_torch_without_a_copy(tfj, phantom_field):
    g = _rng(2)
    x = jnp.asarray(g.standard_normal((6, 3)))
    assert as_tensor(x).data_ptr() == x.unsafe_buffer_pointer()
    ph = phantom_field["ph"]
    fod = jnp.asarray(ph.fod, dtype=jnp.float64)
    field = tf.make_field(fod, jnp.asarray(ph.affine), precomputed=False)
    assert field.sh.data_ptr() == fod.unsafe_buffer_pointer()
    pts, dirs, _ = phantom_seeds(phantom_field, 8, seed=4, dtype=f64)
    jp, jd = jnp.asarray(pts.numpy()), jnp.asarray(dirs.numpy())
    params = tf.resolve([2, 2, 2], max_length=20.0)
    ref = tf.track(tf.make_field(torch.as_tensor(ph.fod, dtype=f64), ph.affine, precomputed=False), params, pts,
                   dirs, engine="eager")
    out = tf.track(field, params, jp, jd, engine="eager")
    assert len(out.streamlines()) > 0 and all(torch.equal(a, b) for a, b in zip(out.streamlines(), ref.streamlines()))
    # nothing wrote into the JAX buffers torch saw
    assert np.array_equal(np.asarray(jp), pts.numpy()) and np.array_equal(np.asarray(fod), ph.fod.astype(np.float64))


# --------------------------------------------------------------------------------------------------
# tractfunc.interop.jax: values and gradients against torch


def _grads_match(jax_loss, torch_loss, *arrays):
    """jax.value_and_grad of ``jax_loss`` equals torch autograd of ``torch_loss`` at ``arrays`` (float64)."""
    val, grads = jax.value_and_grad(jax_loss, argnums=tuple(range(len(arrays))))(*map(jnp.asarray, arrays))
    leaves = [torch.tensor(a, requires_grad=True) for a in arrays]
    ref = torch_loss(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves)
    _close(val, ref.detach().numpy())
    for gj, gt in zip(grads, ref_grads):
        assert float(np.abs(gt.numpy()).max()) > 0   # a gradient that can be wrong
        _close(gj, gt.numpy())


def _primitive_case(name, tfj, g):
    """(jax loss, torch loss, inputs) for one primitive; the losses apply the same non-linear map."""
    c, u = g.standard_normal((5, 45)), _unit(g.standard_normal((5, 3)))
    if name == "basis":
        W = g.standard_normal((5, 45))
        return (lambda d: jnp.sum(jnp.sin(tfj.basis(d, 8)) * W),
                lambda d: (torch.sin(sh.basis(d, 8)) * torch.from_numpy(W)).sum(), (u,))
    if name == "amplitude":
        return (lambda c, d: jnp.sum(tfj.amplitude(c, d) ** 3), lambda c, d: (sh.amplitude(c, d) ** 3).sum(), (c, u))
    if name == "sh_jet":
        def jl(c, d):
            j = tfj.sh_jet(c, d)
            return jnp.sum(j.amp ** 2) + jnp.sum(jnp.sin(j.grad)) + jnp.sum(j.hess ** 2)

        def tl(c, d):
            j = sh.sh_jet(c, d)
            return (j.amp ** 2).sum() + torch.sin(j.grad).sum() + (j.hess ** 2).sum()
        return jl, tl, (c, u)
    if name == "trilinear":
        vol, vox = g.standard_normal((4, 5, 6, 3)), g.uniform(0.05, 2.95, (11, 3))   # inside cells
        return (lambda v, x: jnp.sum(jnp.cos(tfj.trilinear(v, x).values)),
                lambda v, x: torch.cos(interpolate.trilinear(v, x).values).sum(), (vol, vox))
    # peak: a two-lobe FOD, start directions near one lobe; loss on direction and amplitude
    axes = _unit(np.array([[1.0, 0.2, 0.1], [0.1, 1.0, -0.3]]))
    dirs = _unit(g.standard_normal((400, 3)))
    amp = np.exp(-8 * (1 - (dirs @ axes.T) ** 2)).sum(1)
    coef = np.linalg.lstsq(sh.basis(torch.from_numpy(dirs), 8).numpy(), amp, rcond=None)[0]
    u0 = _unit(axes[0] + 0.2 * g.standard_normal((4, 3)))
    W = g.standard_normal((4, 3))
    def jl(c, u):
        p = tfj.peak(c, u)
        return jnp.sum(p.dir * W) + jnp.sum(p.amp ** 2)

    def tl(c, u):
        p = direction.peak(c, u)
        return (p.dir * torch.from_numpy(W)).sum() + (p.amp ** 2).sum()
    return jl, tl, (coef, u0)


@pytest.mark.parametrize("name", ["basis", "amplitude", "sh_jet", "trilinear", "peak"])
def test_primitive_values_and_gradients_match_torch(tfj, name):
    jl, tl, arrays = _primitive_case(name, tfj, _rng(10))
    _grads_match(jl, tl, *arrays)


@pytest.fixture(scope="module")
def track_case(phantom_field):
    """The phantom as a float64 FOD array with tracking inputs: 6 seeds with supra-threshold peaks."""
    ph = phantom_field["ph"]
    fod = ph.fod.astype(np.float64)
    field = tf.make_field(torch.from_numpy(fod), ph.affine, precomputed=False)
    pts, dirs, _ = phantom_seeds(phantom_field, 64, seed=5, dtype=f64)
    pk = direction.peak(field.sample(pts).values, dirs)
    keep = torch.nonzero(pk.amp > 0.3).squeeze(1)[:6]
    assert keep.numel() == 6
    return dict(fod=fod, affine=ph.affine, seeds=pts[keep].numpy(), dirs=dirs[keep].numpy(),
                peak_dirs=pk.dir[keep].numpy(), params=tf.resolve([2, 2, 2], precomputed=False))


@pytest.mark.parametrize("scheme", ["euler", "rk4"])
def test_one_step_values_and_gradients_match_torch(tfj, track_case, scheme):
    k = track_case
    prm = tf.resolve([2, 2, 2], rk4=scheme == "rk4", precomputed=False)
    W = _rng(11).standard_normal((6, 3))

    def jl(s, p):
        m = getattr(tfj, scheme)(s, prm, p, k["peak_dirs"], affine=k["affine"])
        return jnp.sum(jnp.sin(m.pos) * W) + jnp.sum(m.dir * W) + jnp.sum(m.amp ** 2)

    def tl(s, p):
        m = getattr(integrate, scheme)(tf.make_field(s, k["affine"], precomputed=False), prm, p,
                                       torch.from_numpy(k["peak_dirs"]))
        assert bool((m.reason == 0).all())   # every streamline moves (the gradient is not trivially zero)
        return (torch.sin(m.pos) * torch.from_numpy(W)).sum() + (m.dir * torch.from_numpy(W)).sum() + (m.amp ** 2).sum()
    _grads_match(jl, tl, k["fod"], k["seeds"])


def _track_losses(tfj, k, T, temperature=None):
    W = _rng(12).standard_normal((6, 2 * T + 1, 3))

    def jl(s, p):
        r = tfj.track_fixed(s, k["params"], p, k["dirs"], T, affine=k["affine"],
                            temperature=temperature)
        return jnp.sum(r.weights[..., None] * jnp.sin(r.vertices) * W)

    def tl(s, p):
        r = tf.track_fixed(tf.make_field(s, k["affine"], precomputed=False), k["params"], p,
                           torch.from_numpy(k["dirs"]), T, temperature=temperature)
        assert int(r.valid.sum(1).gt(5).sum()) >= 4   # most streamlines take several steps
        return (r.weights[..., None] * torch.sin(r.vertices) * torch.from_numpy(W)).sum()
    return jl, tl


def test_track_fixed_gradient_wrt_seeds_and_fod_matches_torch(tfj, track_case):
    """jax.grad of a loss on whole fixed-length streamlines (8 steps per half), wrt the seeds and every FOD
    coefficient, equals torch autograd's; outputs keep their dtypes and shapes."""
    k = track_case
    T = 8
    r = tfj.track_fixed(k["fod"], k["params"], k["seeds"], k["dirs"], T, affine=k["affine"])
    ref = tf.track_fixed(tf.make_field(torch.from_numpy(k["fod"]), k["affine"], precomputed=False), k["params"],
                         torch.from_numpy(k["seeds"]), torch.from_numpy(k["dirs"]), T)
    for a, b in zip(r, ref):
        np.testing.assert_array_equal(np.asarray(a), b.numpy().astype(np.asarray(a).dtype))
    assert r.vertices.dtype == jnp.float64 and r.valid.dtype == jnp.bool_ and r.reason_fwd.dtype == jnp.int32
    _grads_match(*_track_losses(tfj, k, T), k["fod"], k["seeds"])


def test_jit_and_vmap_give_the_eager_results(tfj, track_case):
    """Under jax.jit the torch calls run through jax.pure_callback; soft-termination weights carry the loss."""
    k = track_case
    jl, _ = _track_losses(tfj, k, 5, temperature=0.05)
    args = (jnp.asarray(k["fod"]), jnp.asarray(k["seeds"]))
    eager = jax.value_and_grad(jl, argnums=(0, 1))(*args)
    jitted = jax.jit(jax.value_and_grad(jl, argnums=(0, 1)))(*args)
    for a, b in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(eager)):
        _close(a, b)
    assert float(jnp.abs(eager[1][1]).max()) > 0
    g = _rng(13)
    c, u = jnp.asarray(g.standard_normal((3, 45))), jnp.asarray(_unit(g.standard_normal((3, 4, 3))))
    _close(jax.vmap(tfj.amplitude)(c[:, None, :], u), tfj.amplitude(c[:, None, :], u))
    _close(jax.jit(jax.grad(lambda c: jnp.sum(tfj.amplitude(c, u[0]))))(c[0]),
           jax.grad(lambda c: jnp.sum(tfj.amplitude(c, u[0])))(c[0]))


def test_track_fixed_rejects_mismatched_inputs(tfj, track_case):
    k = track_case
    kw = dict(affine=k["affine"])
    with pytest.raises(TractfuncError, match="expected one dtype"):
        tfj.track_fixed(k["fod"], k["params"], k["seeds"].astype(np.float32), k["dirs"], 2, **kw)
    with pytest.raises(TractfuncError, match=r"expected both \(B, 3\)"):
        tfj.track_fixed(k["fod"], k["params"], k["seeds"][:, :2], k["dirs"][:, :2], 2, **kw)


# --------------------------------------------------------------------------------------------------
# tfj.track: tractfunc.track (the fused engine) with fixed-shape per-seed outputs


@pytest.fixture(scope="module")
def fast_case(phantom_field):
    """float64 phantom FOD, 10 seeds with random start directions, exact peaks (the fused engine's gradient
    setting), 20 mm streamlines at most, the tracking mask; W weighs every vertex slot of the loss."""
    ph = phantom_field["ph"]
    pts, dirs, _ = phantom_seeds(phantom_field, 10, seed=7, dtype=f64)
    params = tf.resolve([2, 2, 2], exact=True, max_length=20.0)
    L = params.max_points + 1
    return dict(fod=ph.fod.astype(np.float64), affine=ph.affine, seeds=pts.numpy(), dirs=dirs.numpy(),
                params=params, mask=phantom_field["mask"], L=L, W=_rng(14).standard_normal((10, L, 3)))


def _fast_losses(tfj, k):
    """(jax loss of tfj.track, torch loss of tf.track on the same streamlines): sum of W * sin(vertex)."""
    def jl(s, p):
        r = tfj.track(s, k["params"], p, k["dirs"], affine=k["affine"], mask=k["mask"])
        return jnp.sum(jnp.where(r.valid[..., None], jnp.sin(r.vertices) * k["W"], 0.0))

    def tl(s, p):
        tr = tf.track(tf.make_field(s, k["affine"], precomputed=False), k["params"], p, torch.from_numpy(k["dirs"]),
                      mask=k["mask"])
        assert tr.engine == "follow" and len(tr.lengths) >= 6   # the fused engine, most seeds accepted
        W = torch.from_numpy(k["W"])
        return sum((torch.sin(v) * W[i, :len(v)]).sum() for v, i in zip(tr.streamlines(), tr.seed_ids.tolist()))
    return jl, tl


def test_track_rows_are_tf_track_streamlines(tfj, fast_case):
    """Each accepted seed's row holds tf.track's streamline (bit for bit), the other rows are empty, and the
    default row length bounds every streamline (the budget counts both halves; the backward half adds one)."""
    k = fast_case
    r = tfj.track(k["fod"], k["params"], k["seeds"], k["dirs"], affine=k["affine"], mask=k["mask"])
    ref = tf.track(tf.make_field(torch.from_numpy(k["fod"]), k["affine"], precomputed=False), k["params"],
                   torch.from_numpy(k["seeds"]), torch.from_numpy(k["dirs"]), mask=k["mask"])
    assert r.vertices.shape == (10, k["L"], 3) and r.vertices.dtype == jnp.float64 and r.lengths.dtype == jnp.int32
    assert int(ref.lengths.max()) == k["L"]          # a streamline reaches the bound: the bound is tight
    for sl, i, si in zip(ref.streamlines(), ref.seed_ids.tolist(), ref.seed_index.tolist()):
        n = len(sl)
        np.testing.assert_array_equal(np.asarray(r.vertices[i, :n]), sl.numpy())
        assert int(r.lengths[i]) == n and int(r.seed_index[i]) == si and bool(r.valid[i, :n].all())
    np.testing.assert_array_equal(np.asarray(r.accepted), ref.accepted.numpy())
    np.testing.assert_array_equal(np.asarray(r.reasons), ref.reasons.numpy())
    assert int(r.valid.sum()) == ref.vertices.shape[0] and float(jnp.abs(jnp.where(r.valid[..., None], 0,
                                                                                  r.vertices)).max()) == 0
    fod = jnp.asarray(k["fod"])                        # one JAX array twice: the second call reuses its field
    again = [tfj.track(fod, k["params"], k["seeds"], k["dirs"], affine=k["affine"], mask=k["mask"]) for _ in "ab"]
    assert len(tfj._FIELDS) == 1 and next(iter(tfj._FIELDS.values()))[0]() is fod
    for x, y, z in zip(r, *again):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
        np.testing.assert_array_equal(np.asarray(z), np.asarray(x))
    with pytest.raises(TractfuncError, match="more than max_vertices"):
        tfj.track(k["fod"], k["params"], k["seeds"], k["dirs"], affine=k["affine"], mask=k["mask"],
                  max_vertices=k["L"] - 1)


def test_track_gradient_wrt_seeds_and_fod_equals_torch_track(tfj, fast_case):
    """jax.grad through tfj.track equals torch autograd through tf.track (the fused engine's C reverse sweep),
    float64, exact peaks, wrt every FOD coefficient and the seeds."""
    k = fast_case
    _grads_match(*_fast_losses(tfj, k), k["fod"], k["seeds"])


def test_track_jit_kept_and_dropped_graphs(tfj, fast_case):
    """Under jax.jit the gradient equals the eager one; the forward's graph is used once and released; a backward
    that finds no kept graph (dropped, or a second call of the same vjp) recomputes it with the same result; a
    gradient wrt the seeds alone (the FOD not differentiated: no FOD gradient is computed) is the same."""
    k = fast_case
    jl, _ = _fast_losses(tfj, k)
    args = (jnp.asarray(k["fod"]), jnp.asarray(k["seeds"]))
    eager = jax.value_and_grad(jl, argnums=(0, 1))(*args)
    assert len(tfj._GRAPHS) == 0                                     # kept from forward to backward, then freed
    jitted = jax.jit(jax.value_and_grad(jl, argnums=(0, 1)))(*args)
    for a, b in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(eager)):
        _close(a, b)
    val, vjp = jax.vjp(jl, *args)
    assert len(tfj._GRAPHS) == 1
    tfj._GRAPHS.clear()                                              # as if dropped by KEEP_GRAPHS
    for _ in range(2):
        for a, b in zip(vjp(jnp.ones_like(val)), eager[1]):
            _close(a, b)
    _close(jax.grad(jl, argnums=1)(*args), eager[1][1])
