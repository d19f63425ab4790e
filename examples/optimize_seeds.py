"""Optimise seed points so that their streamlines end inside a target region (real in-vivo data).

Differentiable tracking turns "where should I seed so that the streamline ends *there*?" into plain
gradient descent: the forward endpoint of every streamline is a (piecewise smooth) function of its seed,
``tractfunc.track`` differentiates through every SD_Stream step (on the CPU the fused engine: the C kernel's
forward with tckgen's decisions, exact peaks, one C reverse sweep), and Adam moves the seeds.

Setup (a crop of the corpus callosum of the Philips in-vivo FOD, see ``crop`` below):

* seed cloud: ``n_seeds`` points uniform in a 3 mm ball around a midline corpus-callosum voxel, all with
  the same initial direction (+x, left-right), so every forward half follows the callosal fibres;
* target: a sphere (radius 2 mm) around the forward endpoint of the streamline tracked from another
  midline voxel 5-9 mm away -- a point the bundle reaches, but not from where the cloud starts;
* streamlines of ``n_steps / 2`` to ``n_steps`` steps of 0.5 mm (``min_length``, ``max_length``, both halves
  together; the forward half is tracked first, and one that runs the whole length leaves the backward half
  no budget);
* loss: mean squared distance between each streamline's forward endpoint (its first vertex) and the
  target centre.  A seed without an accepted streamline (outside the mask, no peak above the cutoff, too
  short) has its seed as endpoint, so it is pulled straight towards the target until it tracks again.

Prints loss and hit fraction before/after, writes ``optimize_seeds.png`` and a final JSON line.
Time (full size, the 2-core machine of examples/README.md, load average ~6 from other jobs): the 30 Adam
iterations take 1.25 s (9.7 s wall with loading and the figure); on ``track_fixed`` (this script's previous
version, measured back to back) they took 51.9 s (61.4 s wall).
Run: ``python examples/optimize_seeds.py [--quick] [--out DIR] [--data DIR]``.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

import tractfunc as tf
from tractfunc.core import newton as direction

# examples/ is on sys.path when run as ``python examples/<name>.py``
from _common import CROP_SIZE, base_parser, load_crop, parse_args, pyplot, save_figure


def voxel_centres(idx: torch.Tensor, affine) -> torch.Tensor:
    A = torch.as_tensor(affine, dtype=torch.float64)
    return idx.to(torch.float64) @ A[:3, :3].T + A[:3, 3]


def midline_candidates(crop, axis_dir: torch.Tensor):
    """WM voxels within 2 mm of the crop's mid-sagittal plane, ranked by FOD peak amplitude along +x."""
    idx = torch.nonzero(crop["wm"])
    pos = voxel_centres(idx, crop["affine"])
    xmid = voxel_centres(torch.tensor([[CROP_SIZE[0] / 2 - 0.5, 0, 0]]), crop["affine"])[0, 0]
    near = (pos[:, 0] - xmid).abs() < 2.0
    idx, pos = idx[near], pos[near]
    c = crop["sh"][idx[:, 0], idx[:, 1], idx[:, 2]].to(torch.float64)
    p = direction.peak(c, axis_dir.to(torch.float64).expand(len(c), 3), early_exit=True)
    score = torch.nan_to_num(p.amp, nan=-1.0) * p.dir[:, 0].abs().nan_to_num(0.0) ** 4
    order = torch.argsort(score, descending=True)
    return pos[order]


def forward_ends(tracks) -> torch.Tensor:
    """(A,) index in ``tracks.vertices`` of each accepted streamline's forward endpoint (its first vertex)."""
    return torch.cumsum(tracks.lengths, 0) - tracks.lengths


def main(argv=None):
    args = parse_args(base_parser(__doc__), argv)
    t_start = time.perf_counter()
    n_seeds, n_steps, iters = (48, 16, 8) if args.quick else (192, 30, 30)
    step_mm, radius_seed, radius_target, lr = 0.5, 3.0, 2.0, 0.6
    dtype = torch.float32

    crop = load_crop(args.data, dtype)
    fld = tf.make_field(crop["sh"], crop["affine"], voxel_sizes=crop["voxel_sizes"])
    mask = tf.make_mask(crop["brain"], crop["affine"])
    # exact SH and peaks (smooth gradients); tckgen's decisions from the C kernel
    params = tf.resolve(crop["voxel_sizes"], step=step_mm, min_length=n_steps * step_mm / 2,
                        max_length=n_steps * step_mm, exact=True)
    gen = torch.Generator().manual_seed(0)
    ex = torch.tensor([1.0, 0.0, 0.0])

    # seed centre and target from the data: two midline callosal voxels 5-9 mm apart
    cand = midline_candidates(crop, ex)
    centre = cand[0]
    others = cand[((cand - centre).norm(dim=1) > 5.0) & ((cand - centre).norm(dim=1) < 9.0)][:16]
    ref = tf.track(fld, params, others.to(dtype), ex.expand(len(others), 3).to(dtype), mask=mask)
    full = (ref.reasons[ref.seed_ids, 0] == int(tf.Reason.MAX_LENGTH)).nonzero().squeeze(1)
    if full.numel() == 0:
        print("error: no reference streamline ran its full length forwards; cannot place a target", file=sys.stderr)
        return 1
    target = ref.vertices[int(forward_ends(ref)[full[0]])].detach()

    # seed cloud: uniform in a ball around the centre
    v = torch.randn(n_seeds, 3, generator=gen, dtype=torch.float64)
    r = radius_seed * torch.rand(n_seeds, 1, generator=gen, dtype=torch.float64) ** (1 / 3)
    seeds0 = (centre + r * v / v.norm(dim=1, keepdim=True)).to(dtype)
    init_dirs = ex.expand(n_seeds, 3).to(dtype)

    def run(seeds):
        out = tf.track(fld, params, seeds, init_dirs, mask=mask)     # engine "follow": the fused C engine
        end = seeds.index_copy(0, out.seed_ids, out.vertices[forward_ends(out)])   # the seed where none
        d2 = ((end - target) ** 2).sum(-1)
        return out, d2

    def summary(out, d2):
        d2 = d2.detach()
        hit = out.accepted & (d2.sqrt() < radius_target)
        return dict(loss=float(d2.mean()), hit=float(hit.float().mean()),
                    accepted=float(out.accepted.float().mean()),
                    median_dist=float(d2.sqrt().median()))

    seeds = seeds0.clone().requires_grad_(True)
    opt = torch.optim.Adam([seeds], lr=lr)
    history = []
    t_opt = time.perf_counter()
    for it in range(iters + 1):
        out, d2 = run(seeds)
        loss = d2.mean()
        history.append(float(loss.detach()))
        if it == 0:
            before = summary(out, d2)
            out0 = out
        if it == iters:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"iter {it:3d}  loss {float(loss.detach()):8.3f} mm^2  hits {summary(out, d2)['hit']:.3f}", flush=True)
    after = summary(out, d2)
    t_opt = time.perf_counter() - t_opt

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "optimize_seeds.png")
    plot(png, out0, out, seeds0, seeds.detach(), target, radius_target, history)

    moved = (seeds.detach() - seeds0).norm(dim=1)
    result = dict(example="optimize_seeds", quick=args.quick, engine=out.engine, n_seeds=n_seeds, n_steps=n_steps,
                  iterations=iters, step_mm=step_mm, target_mm=[round(float(x), 3) for x in target],
                  target_radius_mm=radius_target,
                  loss_before=before["loss"], loss_after=after["loss"],
                  hit_fraction_before=before["hit"], hit_fraction_after=after["hit"],
                  accepted_before=before["accepted"], accepted_after=after["accepted"],
                  median_dist_before=before["median_dist"], median_dist_after=after["median_dist"],
                  median_seed_move_mm=float(moved.median()), optimise_s=round(t_opt, 2),
                  wall_s=round(time.perf_counter() - t_start, 2), figure=png)
    print(f"loss (mean squared endpoint-target distance): {before['loss']:.3f} -> {after['loss']:.3f} mm^2")
    print(f"median endpoint-target distance: {before['median_dist']:.2f} -> {after['median_dist']:.2f} mm")
    print(f"endpoints within {radius_target} mm of the target: {before['hit']:.3f} -> {after['hit']:.3f}")
    print(f"accepted streamlines: {before['accepted']:.3f} -> {after['accepted']:.3f}")
    print(f"figure: {png}")
    print(json.dumps(result))
    return 0


def plot(png, out0, out1, seeds0, seeds1, target, radius, history):
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    axes[1].sharex(axes[0])
    axes[1].sharey(axes[0])
    for ax, out, s, title in ((axes[0], out0, seeds0, "before"), (axes[1], out1, seeds1, "after")):
        for sl, si in zip(out.streamlines(), out.seed_index.tolist()):
            v = sl.detach().numpy()
            ax.plot(v[:si + 1, 0], v[:si + 1, 1], color="tab:blue", lw=0.6, alpha=0.6)
            ax.plot(v[si:, 0], v[si:, 1], color="0.7", lw=0.5, alpha=0.5)
        E = out.vertices.detach()[forward_ends(out)].numpy()
        ax.scatter(E[:, 0], E[:, 1], s=6, color="tab:red", zorder=3, label="forward endpoints")
        ax.scatter(s[:, 0].numpy(), s[:, 1].numpy(), s=6, color="k", zorder=3, label="seeds")
        ax.add_patch(plt.Circle((float(target[0]), float(target[1])), radius, fill=False, color="tab:green",
                                lw=2, zorder=4, label="target sphere"))
        ax.set_title(f"{title}: forward halves (blue), backward halves (grey)")
        ax.set_xlabel("x (mm)")
        ax.set_ylabel("y (mm)")
        ax.set_aspect("equal")
    axes[0].legend(loc="lower left", fontsize=8)
    axes[2].plot(history, "o-", ms=3)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("Adam iteration")
    axes[2].set_ylabel("mean squared endpoint-target distance (mm$^2$)")
    axes[2].set_title("loss")
    fig.suptitle("Seed optimisation through differentiable SD_Stream tracking (corpus callosum, axial projection)")
    save_figure(fig, png)


if __name__ == "__main__":
    sys.exit(main())
