"""Optimise seeds so that more streamlines of a bundle reach a target region under soft ACT (real in-vivo data).

Anatomically-constrained tracking rejects streamlines that end badly (in CSF, or by the FOD cutoff in white
matter) and tckgen's include regions reject those that miss a region: both are hard, gradient-free decisions.
With soft ACT (``track_fixed(..., temperature=T, act=, regions=)``, proofs/soft_act.md) each of them becomes a
smooth weight: ``acceptance`` (B,) is the soft probability that tckgen's rules (ACT's tissue rules, the include
region, the length limits) accept a streamline, differentiable wrt the seeds.  Adam moves the seeds to raise it.

Setup (the corpus-callosum crop of the Philips FOD and its 5TT image, see ``_common.load_crop``):

* source: ``n_seeds`` points in a 3 mm ball around a midline callosal voxel, start direction +x;
* target: an include sphere (radius 4 mm) around the forward end of the streamline from another midline voxel
  5-9 mm away (a place the bundle reaches, but not from where the cloud starts);
* loss: minus the mean soft acceptance (T = 0.05 for the tissue and region margins and the cutoff / angle).

Before / after: the mean soft acceptance, and the hard count with tckgen's rules (the native kernel with ``act=``
and the include region, the same seeds): streamlines accepted.  Ends with a JSON line.
Run: ``python examples/optimize_bundle_act.py [--quick] [--out DIR] [--data DIR]``.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

import tractfunc as tf
from tractfunc.sdstream import fixed as tracking

# examples/ is on sys.path when run as ``python examples/<name>.py``
from _common import CROP_SIZE, CROP_START, base_parser, load_crop, parse_args, pyplot, save_figure
from optimize_seeds import midline_candidates


def load_5tt_crop(data_dir: str, dtype) -> torch.Tensor:
    """The Philips 5TT image on the crop (same grid as the FOD)."""
    tt = tf.io.load_5tt(os.path.join(data_dir, "dwi_5tt.nii.gz"))
    sl = tuple(slice(a, a + n) for a, n in zip(CROP_START, CROP_SIZE))
    return torch.as_tensor(np.ascontiguousarray(tt.data[sl]), dtype=dtype)


def main(argv=None):
    args = parse_args(base_parser(__doc__), argv)
    t_start = time.perf_counter()
    n_seeds, n_steps, iters = (32, 16, 6) if args.quick else (128, 30, 25)
    step_mm, radius_seed, radius_target, lr, temp = 0.5, 3.0, 4.0, 0.5, 0.05
    dtype = torch.float32
    if not os.path.exists(os.path.join(args.data, "dwi_5tt.nii.gz")):
        load_crop(args.data, dtype)   # exits 2 naming what is missing when the data set is absent
        print(f"error: real data not found: {os.path.join(args.data, 'dwi_5tt.nii.gz')}", file=sys.stderr)
        return 2
    crop = load_crop(args.data, dtype)
    fld = tf.make_field(crop["sh"], crop["affine"], precomputed=False)   # exact SH: smooth gradients
    mask = tf.make_mask(crop["brain"], crop["affine"])
    tissues = load_5tt_crop(args.data, dtype)
    act = tf.make_act(tissues, crop["affine"])
    params = tf.resolve(crop["voxel_sizes"], step=step_mm, act=True)
    ex = torch.tensor([1.0, 0.0, 0.0])

    cand = midline_candidates(crop, ex)
    centre = cand[0]
    others = cand[((cand - centre).norm(dim=1) > 5.0) & ((cand - centre).norm(dim=1) < 9.0)][:16]
    with torch.no_grad():
        ref = tracking.track_fixed(fld, params, others.to(dtype), ex.expand(len(others), 3).to(dtype), n_steps, mask)
    full = torch.nonzero(ref.reason_fwd == int(tf.Reason.CONTINUE)).squeeze(1)
    if full.numel() == 0:
        print("error: no reference streamline ran its full forward half; cannot place a target", file=sys.stderr)
        return 1
    target = ref.vertices[int(full[0]), 0].detach().double()
    regions = tf.Regions(include=(tf.Sphere(tuple(target.tolist()), radius_target),))

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(n_seeds, 3, generator=gen, dtype=torch.float64)
    r = radius_seed * torch.rand(n_seeds, 1, generator=gen, dtype=torch.float64) ** (1 / 3)
    seeds0 = (centre + r * v / v.norm(dim=1, keepdim=True)).to(dtype)
    init_dirs = ex.expand(n_seeds, 3).to(dtype)

    def soft(seeds):
        return tracking.track_fixed(fld, params, seeds, init_dirs, n_steps, mask, temperature=temp, act=act,
                                    regions=regions)

    # the hard check: tckgen's rules on the native kernel (its lookup-table peaks, float32), the same seeds
    hard_params = tf.resolve(crop["voxel_sizes"], step=step_mm, act=True)
    hard_field = tf.make_field(crop["sh"], crop["affine"])

    def hard(seeds):
        out = tf.track(hard_field, hard_params, seeds.detach(), init_dirs, mask=mask, act=act, regions=regions)
        return int(out.accepted.sum())

    seeds = seeds0.clone().requires_grad_(True)
    opt = torch.optim.Adam([seeds], lr=lr)
    history = []
    t_opt = time.perf_counter()
    for it in range(iters + 1):
        out = soft(seeds)
        score = out.acceptance.mean()
        history.append(float(score.detach()))
        if it == 0:
            before = dict(soft=float(score.detach()), reach=float(out.reach.mean().detach()))
            out0 = out
        if it == iters:
            break
        opt.zero_grad()
        (-score).backward()
        opt.step()
        print(f"iter {it:3d}  mean soft acceptance {history[-1]:.4f}", flush=True)
    after = dict(soft=float(score.detach()), reach=float(out.reach.mean().detach()))
    t_opt = time.perf_counter() - t_opt
    hard_before, hard_after = hard(seeds0), hard(seeds.detach())

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "optimize_bundle_act.png")
    plot(png, out0, out, target, radius_target, history)
    moved = (seeds.detach() - seeds0).norm(dim=1)
    result = dict(example="optimize_bundle_act", quick=args.quick, n_seeds=n_seeds, n_steps=n_steps,
                  iterations=iters, temperature=temp, step_mm=step_mm,
                  target_mm=[round(float(x), 3) for x in target], target_radius_mm=radius_target,
                  soft_acceptance_before=before["soft"], soft_acceptance_after=after["soft"],
                  soft_reach_before=before["reach"], soft_reach_after=after["reach"],
                  hard_accepted_before=hard_before, hard_accepted_after=hard_after,
                  median_seed_move_mm=float(moved.median()), optimise_s=round(t_opt, 2),
                  wall_s=round(time.perf_counter() - t_start, 2), figure=png)
    print(f"mean soft acceptance (ACT + include region): {before['soft']:.4f} -> {after['soft']:.4f}")
    print(f"mean soft reach of the target: {before['reach']:.4f} -> {after['reach']:.4f}")
    print(f"accepted by tckgen's rules (native kernel, hard ACT + include): {hard_before} -> {hard_after} "
          f"of {n_seeds}")
    print(f"time: {t_opt:.1f} s optimising, {result['wall_s']:.1f} s in all")
    print(f"figure: {png}")
    print(json.dumps(result))
    return 0


def plot(png, out0, out1, target, radius, history):
    """Axial projections of the streamlines before / after (colour: survival weight x acceptance) and the score."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    for ax, out, title in ((axes[0], out0, "before"), (axes[1], out1, "after")):
        V, M = out.vertices.detach().numpy(), out.valid.numpy()
        W = out.weights.detach().numpy()
        for b in range(len(V)):
            m = M[b]
            if m.any():
                ax.scatter(V[b, m, 0], V[b, m, 1], c=W[b, m], s=2, cmap="viridis", vmin=0, vmax=1)
        ax.add_patch(plt.Circle((float(target[0]), float(target[1])), radius, fill=False, color="tab:red", lw=2))
        ax.set_title(f"{title}: vertices coloured by weight (survival x acceptance)")
        ax.set_xlabel("x (mm)")
        ax.set_ylabel("y (mm)")
        ax.set_aspect("equal")
    axes[2].plot(history, "o-", ms=3)
    axes[2].set_xlabel("Adam iteration")
    axes[2].set_ylabel("mean soft acceptance")
    axes[2].set_title("score")
    fig.suptitle("Seeds optimised through soft ACT and a soft include region (corpus callosum, axial projection)")
    save_figure(fig, png)


if __name__ == "__main__":
    sys.exit(main())
