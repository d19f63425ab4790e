"""Soft ACT and soft regions on the fixed-shape engine (``track_fixed(..., temperature=T, act=, regions=)``):
as T -> 0 the weights recover the hard decisions of the native kernel (tckgen's rules) on the same seeds."""
import numpy as np
import pytest
import torch

import tractfunc as tf
from tractfunc import io
from tractfunc.errors import TractfuncError
from tractfunc.sdstream.act import act_seed_ok, region_indicator
from tractfunc.sdstream.fixed import track_fixed
from tractfunc.tools import parity

from conftest import START, require_philips
from test_native import _kernel_available


@pytest.mark.slow
@pytest.mark.parametrize("n,max_length,rois", [(24, 15.0, False), (60, 30.0, True)])
def test_soft_act_tends_to_the_hard_rules_real_data(n, max_length, rois):
    """Philips, ACT (and, under -m slow, an include and an exclude sphere), T = 1e-4, float64, seeds in WM: a
    streamline's acceptance is > 0.5 exactly where the native kernel accepts it, and its vertices of weight > 0.5
    are the native streamline (same count, within 0.1 mm)."""
    d = require_philips()
    _kernel_available()
    fod, tt = io.load_fod(d["fod"]), io.load_5tt(d["5tt"])
    prm = tf.resolve(fod.voxel_sizes, act=True, max_length=max_length)
    f32 = tf.make_field(torch.as_tensor(fod.data), fod.affine, voxel_sizes=fod.voxel_sizes)
    f64 = tf.make_field(torch.as_tensor(fod.data, dtype=torch.float64), fod.affine, voxel_sizes=fod.voxel_sizes)
    a32 = tf.make_act(torch.as_tensor(tt.data), tt.affine, tt.voxel_sizes)
    a64 = tf.make_act(torch.as_tensor(tt.data, dtype=torch.float64), tt.affine, tt.voxel_sizes)
    g = torch.Generator().manual_seed(3)
    seeds = tf.random_in_mask(torch.as_tensor(io.load_mask(d["seed"]).data), fod.affine, 4 * n, g).double()
    seeds = seeds[act_seed_ok(a64, seeds)][:n]
    dirs = torch.tensor([START], dtype=torch.float64).expand_as(seeds).contiguous()
    regions = None
    if rois:
        first = tf.track(f32, prm, seeds.float(), dirs.float(), act=a32)
        ends = torch.stack([ln[-1].double() for ln in first.streamlines()])
        regions = tf.Regions(include=(tf.Sphere(tuple(ends[0].tolist()), 30.0),),   # a region some streamlines reach
                             exclude=(tf.Sphere(tuple(ends[-1].tolist()), 3.0),))
    hard = tf.track(f32, prm, seeds.float(), dirs.float(), act=a32, regions=regions)
    soft = track_fixed(f64, prm, seeds, dirs, prm.max_points, temperature=1e-4, act=a64, regions=regions)
    acc = hard.accepted.numpy()
    A = soft.acceptance.numpy()
    print(f"soft ACT T=1e-4 (regions {rois}): native accepts {acc.sum()} of {len(acc)}; acceptance > 0.5 on "
          f"{(A > 0.5).sum()}, agreement {((A > 0.5) == acc).mean():.3f}")
    assert 0 < acc.sum() < len(acc) and ((A > 0.5) == acc).all()
    for i, line in zip(hard.seed_ids.tolist(), hard.streamlines()):
        keep = soft.valid[i] & (soft.weights[i] > 0.5)
        mine = soft.vertices[i][keep].numpy()
        assert len(mine) == len(line) and parity.hausdorff(mine, line.double().numpy()) < 0.1
    if rois:
        assert float(soft.reach[acc].min()) > 0.5


def test_soft_regions_and_tissues_are_differentiable(phantom_field):
    """On the phantom with a synthetic 5TT (WM with a GM slab), soft ACT + an include sphere: the reach score has a
    finite, non-zero gradient wrt the seeds, the FOD and the tissue maps; hard ACT on the fixed engine is refused."""
    fld, prm = phantom_field["field64"], phantom_field["params"]
    X = fld.sh.shape[:3]
    tt = torch.zeros(*X, 5, dtype=torch.float64)
    tt[..., 2] = 1.0
    tt[X[0] - 3:, ..., 0], tt[X[0] - 3:, ..., 2] = 0.8, 0.2
    tissues = tt.clone().requires_grad_(True)
    aff = torch.linalg.inv(fld.world_to_voxel)
    act = tf.make_act(tissues, aff)
    centre = (aff[:3, :3] @ torch.tensor([X[0] / 2, X[1] / 2, X[2] / 2], dtype=torch.float64) + aff[:3, 3]).tolist()
    regions = tf.Regions(include=(tf.Sphere(tuple(centre), 4.0),))
    seeds = (torch.tensor([centre], dtype=torch.float64) + torch.tensor([[-3.0, 0.5, 0.0], [-2.0, -0.5, 0.3]],
                                                                         dtype=torch.float64)).requires_grad_(True)
    sh = fld.sh.detach().clone().requires_grad_(True)
    d0 = torch.tensor([[1.0, 0.2, 0.0], [1.0, -0.1, 0.1]], dtype=torch.float64)
    out = track_fixed(fld._replace(sh=sh), prm, seeds, d0, 10, temperature=0.05, act=act, regions=regions)
    loss = out.reach.sum() + out.acceptance.sum()
    gs, gf, gt = torch.autograd.grad(loss, (seeds, sh, tissues), allow_unused=True)
    for gr in (gs, gf, gt):
        assert gr is not None and torch.isfinite(gr).all() and float(gr.abs().sum()) > 0
    with pytest.raises(TractfuncError, match="softly"):
        track_fixed(fld, prm, seeds.detach(), None, 5, act=act)
    # the front door: tf.track(engine="fixed", stopping=Soft(T)) carries the acceptance in Tracks.weights
    tr = tf.track(fld, prm, seeds.detach(), d0, engine="fixed", stopping=tf.Soft(0.05), n_steps=10, act=act,
                  regions=regions)
    assert tr.weights is not None and torch.allclose(tr.weights, out.weights[out.valid & out.accepted[:, None]])
    s = region_indicator(tf.Sphere((0.0, 0.0, 0.0), 2.0), torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 3.0]]), 1e-3)
    assert float(s[0]) > 0.999 and float(s[1]) < 1e-3
