"""Optimise FOD coefficients through the tracker so that the soft track density matches a target (real data).

``tractfunc.maps.soft_density`` is the differentiable relaxation of ``tckmap -template``: every vertex belongs
to the voxels around it by a smoothed box kernel, and a streamline counts once per voxel (noisy-OR of its
vertices), weighted by its survival weights under soft termination. Composed with the fixed-shape tracker
(``track_fixed(..., temperature=)``) it makes a voxel-wise density loss a function of the FOD coefficients.

Setup (a crop of the corpus callosum of the Philips in-vivo FOD, as ``optimize_fod.py``):

* seeds: fixed white-matter points within 2 voxels of the mid-sagittal plane, initial direction +x;
* target: the soft density (on the crop's grid) of the streamlines tracked from the same seeds on the FOD
  rotated by 20 degrees about the scanner z axis;
* loss: ``||D(sh) - D_target||^2 / ||D_target||^2 + lam ||sh - sh0||^2 / ||sh0||^2``;
* the hard density (``tractfunc.maps.density``, tckmap's rule) is reported before and after, as the measure
  the soft one stands for.

Prints the loss per iteration; writes ``optimize_density.png`` (target, initial and final density, summed
over z) and a final JSON line. Run: ``python examples/optimize_density.py [--quick] [--out DIR] [--data DIR]``.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

import tractfunc as tf
from tractfunc.maps import density, make_grid, soft_density
from tractfunc.sdstream import fixed as tracking

# examples/ is on sys.path when run as ``python examples/<name>.py``
from _common import CROP_SIZE, base_parser, load_crop, parse_args, pyplot, save_figure
from optimize_fod import rotate_sh, rotation_z


def main(argv=None):
    ap = base_parser(__doc__)
    ap.add_argument("--lr", type=float, default=0.003, help="Adam step on the SH coefficients")
    ap.add_argument("--lam", type=float, default=1.0, help="weight of the relative L2 regulariser")
    ap.add_argument("--iters", type=int, default=None, help="Adam iterations (default 6 quick / 40 full)")
    ap.add_argument("--tau", type=float, default=0.15, help="soft density kernel softness, voxels")
    ap.add_argument("--temperature", type=float, default=0.05, help="soft termination temperature")
    args = parse_args(ap, argv)
    t_start = time.perf_counter()
    n_seeds, n_steps, iters = (32, 10, 6) if args.quick else (192, 25, 40)
    iters = args.iters if args.iters is not None else iters
    dtype = torch.float32
    crop = load_crop(args.data, dtype)
    A, sh0 = crop["affine"], crop["sh"]
    grid = make_grid(A, CROP_SIZE)
    fld0 = tf.make_field(sh0, A, precomputed=False)
    mask = tf.make_mask(crop["brain"], A)
    params = tf.resolve(crop["voxel_sizes"], step=0.5)
    fld_rot = tf.make_field(rotate_sh(sh0, rotation_z(20.0)), A, precomputed=False)

    slab = crop["wm"].clone()
    mid = CROP_SIZE[0] // 2
    slab[:mid - 2] = False
    slab[mid + 2:] = False
    seeds = tf.random_in_mask(slab, A, n_seeds, torch.Generator().manual_seed(1)).to(dtype)
    init = torch.tensor([1.0, 0.0, 0.0], dtype=dtype).expand(n_seeds, 3)

    def run(sh):
        return tracking.track_fixed(fld0._replace(sh=sh), params, seeds, init, n_steps, mask,
                                    temperature=args.temperature).to_tracks(soft=True)

    with torch.no_grad():
        target_tracks = tracking.track_fixed(fld_rot, params, seeds, init, n_steps, mask,
                                             temperature=args.temperature).to_tracks(soft=True)
        target = soft_density(target_tracks, grid, tau=args.tau)
        hard_target = density(target_tracks, grid)
    norm_t, norm0 = float((target ** 2).sum()), float((sh0.double() ** 2).sum())
    param = sh0.clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=args.lr)
    hist = []
    for it in range(iters + 1):
        tracks = run(param)
        D = soft_density(tracks, grid, tau=args.tau)
        data = ((D - target) ** 2).sum() / norm_t
        loss = data + args.lam * ((param - sh0) ** 2).sum() / norm0
        hist.append(float(data.detach()))
        if it == 0:
            D0, tracks0 = D.detach(), tracks
        if it == iters:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"iter {it:3d}  density misfit {hist[-1]:.4f}  streamlines {len(tracks.lengths)}", flush=True)

    def hard_misfit(tr):
        h = density(tr, grid)
        return float(((h - hard_target) ** 2).sum() / (hard_target ** 2).sum())
    hard_before, hard_after = hard_misfit(tracks0), hard_misfit(tracks)
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "optimize_density.png")
    plt = pyplot()
    fig, ax = plt.subplots(1, 4, figsize=(14, 3.4))
    for a, img, title in zip(ax[:3], (target, D0, D.detach()), ("target (rotated FOD)", "initial", "optimised")):
        a.imshow(np.asarray(img.sum(-1).T), origin="lower", cmap="magma")
        a.set_title(f"soft density: {title}")
        a.axis("off")
    ax[3].plot(hist, marker="o")
    ax[3].set_xlabel("iteration")
    ax[3].set_ylabel("relative density misfit")
    save_figure(fig, png)
    result = dict(example="optimize_density", quick=args.quick, n_seeds=n_seeds, n_steps=n_steps, iterations=iters,
                  tau=args.tau, misfit_before=hist[0], misfit_after=hist[-1], hard_misfit_before=hard_before,
                  hard_misfit_after=hard_after, streamlines_after=int(len(tracks.lengths)),
                  seconds=time.perf_counter() - t_start, figure=png)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
