"""The front door: one ``track`` for every engine, one result type, one engine rule with the CLI's defaults."""
import pytest
import torch

from conftest import phantom_seeds

import tractfunc as tf
from tractfunc.core import params as P
from tractfunc.core.tracks import Tracks
from tractfunc.errors import TractfuncError
from tractfunc.sdstream import engine as E


def _short(f, **kw):
    return P.resolve(f["img"].voxel_sizes, max_length=20.0, **kw)


def test_every_engine_draws_the_same_streamlines(phantom_field):
    """native, follow, eager and fixed agree on the phantom (float32: the kernel's arithmetic is tckgen's, the
    PyTorch engines' sums differ in the last bits; fixed == eager bit for bit)."""
    f = phantom_field
    prm = _short(f)
    pts, dirs, fld = phantom_seeds(f, 60, 3)
    runs = {e: tf.track(fld, prm, pts, dirs, mask=f["mask"], engine=e) for e in E.ENGINES[1:]}
    assert {e: r.engine for e, r in runs.items()} == {e: e for e in runs}
    ref = runs["native"]
    assert len(ref.lengths) > 20
    for e, r in runs.items():
        assert torch.equal(r.decisions(), ref.decisions()), e
        assert float((r.vertices - ref.vertices).abs().max()) < 1e-3, e
    assert torch.equal(runs["eager"].vertices, runs["fixed"].vertices)


def test_tracks_views(phantom_field):
    """streamlines(), padded() and decisions() describe the same packed data."""
    f = phantom_field
    pts, dirs, fld = phantom_seeds(f, 30, 4)
    r = tf.track(fld, _short(f), pts, dirs, mask=f["mask"])
    lines = r.streamlines()
    padded, valid = r.padded(fill=float("nan"))
    assert padded.shape == (len(lines), int(r.lengths.max()), 3)
    for i, line in enumerate(lines):
        assert torch.equal(padded[i][valid[i]], line) and torch.isnan(padded[i][~valid[i]]).all()
    d = r.decisions()
    assert d.shape == (30, 4)
    assert torch.equal(d[r.seed_ids, 0] + d[r.seed_ids, 1] + 1, r.lengths)
    rejected = ~r.accepted
    assert (d[rejected, :2] == -1).all()
    assert torch.equal(r.seeds_ok(), r.reasons[:, 0] != int(tf.Reason.SEED_REJECTED))
    assert torch.equal(r.vertex_weights(), torch.ones(r.vertices.shape[0]))


def test_auto_rule_and_its_errors(phantom_field):
    """auto: native (float32, CPU, no gradient), follow (float64 or gradients on the CPU, tckgen's lookup table or
    exact peaks), eager (exact SH at tckgen's tolerance, or traced), fixed (soft or checkpointed); an explicit engine
    that cannot run the job says why in one line."""
    f = phantom_field
    pts, dirs, fld = phantom_seeds(f, 4, 1)
    pts64, dirs64, fld64 = phantom_seeds(f, 4, 1, torch.float64)
    prm = _short(f)
    assert E.choose(E.describe(fld, prm, pts)) == "native"
    assert E.choose(E.describe(fld64, prm, pts64)) == "follow"
    assert E.choose(E.describe(fld64, _short(f, exact=True), pts64)) == "follow"
    assert E.choose(E.describe(fld64, _short(f, precomputed=False), pts64)) == "eager"
    # soft stopping and checkpoints: the follow engine's fused C form where it applies, else fixed
    assert E.choose(E.describe(fld, prm, pts), stopping=tf.Soft(0.1)) == "follow"
    assert E.choose(E.describe(fld64, _short(f, exact=True), pts64), stopping=tf.Soft(0.1)) == "follow"
    assert E.choose(E.describe(fld64, prm, pts64), stopping=tf.Soft(0.1)) == "follow"
    narrow = prm._replace(state_dtype=torch.float32)   # float64 values on tckgen's float32 state: not fused
    assert E.choose(E.describe(fld64, narrow, pts64), stopping=tf.Soft(0.1)) == "fixed"
    assert E.choose(E.describe(fld, prm, pts), gradient=tf.Checkpoint(5)) == "follow"
    assert E.choose(E.describe(fld64, prm, pts64), gradient=tf.Checkpoint(5)) == "follow"
    assert E.choose(E.describe(fld64, narrow, pts64), gradient=tf.Checkpoint(5)) == "fixed"
    grad = E.describe(fld._replace(sh=fld.sh.clone().requires_grad_(True)), prm, pts)
    assert E.choose(grad) == "follow"
    for kw, msg in ((dict(engine="eager", stopping=tf.Soft(0.1)), "engine='fixed'"),
                    (dict(stopping=tf.Soft(0.0)), "temperature > 0"),
                    (dict(gradient=tf.Checkpoint(0)), "every >= 1"),
                    (dict(engine="native", stopping=tf.Soft(0.1)), "stops hard"),
                    (dict(engine="follow", gradient=tf.Checkpoint(3), f64=True,
                          params=prm._replace(state_dtype=torch.float32)), "fused C form"),
                    (dict(engine="fixed", compiled=True), "compiled"),
                    (dict(compiled=True, params=_short(f, rk4=True)), "not apply to RK4")):
        args = (fld64, kw.pop("params", prm), pts64, dirs64) if kw.pop("f64", False) else (
            fld, kw.pop("params", prm), pts, dirs)
        with pytest.raises(TractfuncError, match=msg):
            tf.track(*args, **kw)


def test_soft_and_checkpointed_through_the_front_door(phantom_field):
    """Soft stopping returns per-vertex weights in (0, 1]; a checkpointed gradient equals the direct one; as the
    temperature goes to 0 the soft streamlines' hard part is the hard streamline."""
    f = phantom_field
    prm = _short(f, exact=True)
    pts, dirs, fld = phantom_seeds(f, 8, 5, torch.float64)
    sh = fld.sh.clone().requires_grad_(True)
    grads = []
    for gradient in (None, tf.Checkpoint(4)):
        r = tf.track(fld._replace(sh=sh), prm, pts, dirs, mask=f["mask"], stopping=tf.Soft(0.05), gradient=gradient,
                     engine="fixed")
        assert r.engine == "fixed" and r.weights.shape == r.vertices.shape[:1]
        assert bool(((r.weights > 0) & (r.weights <= 1)).all())
        (g,) = torch.autograd.grad((r.weights[:, None] * r.vertices).sum(), sh)
        grads.append(g)
    assert torch.equal(grads[0], grads[1]) and float(grads[0].abs().sum()) > 0
    hard = tf.track(fld, prm, pts, dirs, mask=f["mask"], engine="eager")
    cold = tf.track(fld, prm, pts, dirs, mask=f["mask"], stopping=tf.Soft(1e-6), engine="fixed")
    for h, c, w in zip(hard.streamlines(), cold.streamlines(),
                       torch.split(cold.weights, cold.lengths.tolist())):
        assert torch.equal(c[w > 0.5], h)


def test_gradient_defaults_in_one_place(phantom_field):
    """resolve(exact=True) is the gradient setting (exact SH and peaks, whatever the field's table);
    resolve(step=tensor) makes the step differentiable; init_dirs=None tracks from the strongest peak;
    n_steps=None never cuts a streamline."""
    f = phantom_field
    exact = P.resolve(f["img"].voxel_sizes, exact=True)
    assert not exact.precomputed and exact.peak_polish == 3
    step = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    prm = P.resolve(f["img"].voxel_sizes, max_length=15.0, step=step, exact=True)
    assert prm.step is step and prm.max_points == P.resolve(f["img"].voxel_sizes, max_length=15.0,
                                                             step=0.2).max_points
    pts, _, fld = phantom_seeds(f, 6, 7, torch.float64)
    out = tf.track_fixed(fld, prm, pts, mask=f["mask"])   # the field still has its lookup table
    no_table = tf.track_fixed(fld._replace(table=None), prm, pts, mask=f["mask"])
    assert torch.equal(out.vertices, no_table.vertices)
    assert out.vertices.shape[1] == 2 * prm.max_points + 1
    assert not ((out.reason_fwd == int(tf.Reason.CONTINUE)) | (out.reason_bwd == int(tf.Reason.CONTINUE))).any()
    (g,) = torch.autograd.grad(out.vertices[out.valid].sum(), step)
    assert torch.isfinite(g) and float(g.abs()) > 0


def test_strongest_peak_is_the_highest_amplitude(phantom_field):
    """strongest_peak's amplitude is the highest over a dense sphere at each seed (to the sphere's spacing)."""
    f = phantom_field
    pts, _, fld = phantom_seeds(f, 10, 8, torch.float64)
    fld = fld._replace(table=None)
    d = tf.strongest_peak(fld, pts)
    c = fld.sample(pts).values
    g = torch.randn(20000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = g / g.norm(dim=-1, keepdim=True)
    dense = tf.sh.amplitude(c[:, None, :], g[None]).max(1).values
    amp = tf.sh.amplitude(c, d)
    assert torch.allclose(d.norm(dim=-1), torch.ones(10, dtype=torch.float64))
    assert bool((amp >= dense - 1e-3 * dense.abs()).all())


def test_short_fixed_runs_report_their_cut(phantom_field):
    """n_steps below what a streamline needs: the cut halves say CONTINUE and still count as accepted (their
    length is unknown), where the old rule rejected every run shorter than min_points."""
    f = phantom_field
    prm = P.resolve(f["img"].voxel_sizes)
    pts, dirs, fld = phantom_seeds(f, 20, 9, torch.float64)
    out = tf.track_fixed(fld, prm, pts, dirs, n_steps=5, mask=f["mask"])
    assert 2 * 5 + 1 < prm.min_points
    cut = (out.reason_fwd == int(tf.Reason.CONTINUE)) | (out.reason_bwd == int(tf.Reason.CONTINUE))
    assert cut.any() and bool(out.accepted[cut].all())
    packed = out.to_tracks()
    assert isinstance(packed, Tracks) and packed.engine == "fixed" and len(packed.lengths) == int(out.accepted.sum())


def test_results_share_one_type(phantom_field):
    """track (any engine) returns tractfunc.Tracks; track_fixed's padded record packs into it."""
    f = phantom_field
    pts, dirs, fld = phantom_seeds(f, 5, 2)
    for e in E.ENGINES:
        assert isinstance(tf.track(fld, _short(f), pts, dirs, engine=e), tf.Tracks)
    empty = tf.track(fld, _short(f), pts[:0], dirs[:0])
    assert isinstance(empty, tf.Tracks) and empty.vertices.shape == (0, 3) and empty.streamlines() == []
    fx = tf.track_fixed(fld, _short(f), pts, dirs, n_steps=3)
    lines = fx.to_tracks().streamlines()
    kept = [fx.vertices[i][fx.valid[i]] for i in range(5) if fx.accepted[i]]
    assert len(lines) == len(kept) > 0 and all(torch.equal(a, b) for a, b in zip(lines, kept))


def test_local_tracking_packs_into_tracks(phantom_field):
    """The DIPY family's LocalTracks packs into the same tf.Tracks: the same streamlines, the seed at seed_index."""
    from tractfunc.local import getters, tracker
    f = phantom_field
    ph = f["ph"]
    sh = torch.as_tensor(ph.fod, dtype=torch.float64)
    g = getters.deterministic_maximum(sh, max_angle=30, sh_basis="mrtrix", affine=ph.affine, sh_frame="scanner")
    vox = torch.nonzero(torch.as_tensor(ph.seed_mask))[::400].double()
    seeds = vox @ torch.as_tensor(ph.affine[:3, :3]).T + torch.as_tensor(ph.affine[:3, 3])
    res = tracker.local_tracking(g, tracker.binary_criterion(torch.as_tensor(ph.mask)), seeds, step_size=0.5,
                                 maxlen=60)
    t = res.to_tracks()
    assert isinstance(t, tf.Tracks) and t.engine == "local" and len(t.lengths) > 3
    lines = res.streamlines()
    assert len(lines) == len(t.streamlines())
    for a, b, sid, si in zip(lines, t.streamlines(), t.seed_ids.tolist(), t.seed_index.tolist()):
        assert torch.equal(torch.as_tensor(a), b)
        assert torch.allclose(b[si], seeds[sid], atol=1e-9)
