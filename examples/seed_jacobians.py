"""How sensitive are streamline endpoints to where the seed is placed?  Per-streamline Jacobians (real data).

``tractfunc.seed_jacobian`` returns d(vertex)/d(seed) for every vertex of every streamline of a batch in
one forward-mode pass (``torch.func.jvp`` under ``vmap``; no loop over streamlines).  The spectral norm of
the 3x3 endpoint Jacobian says by how many mm an endpoint moves, at most, per mm of seed displacement.
Since sliding the seed along its own streamline slides the endpoint by about as much (fixed number of
steps), that norm is >= ~1; its transverse part (both tangents projected out) measures how neighbouring
streamlines spread apart (> 1) or stay together (< 1).

Setup (a crop of the corpus callosum of the Philips in-vivo FOD): seeds in the white matter within 2
voxels of the mid-sagittal plane with initial direction +x (the callosal bundle), float64, exact SH
evaluation and exact (polished) peaks so that central finite differences can check the Jacobians.

Prints the median / max endpoint sensitivity, checks a few endpoint Jacobians against central finite
differences (relative error), writes ``seed_jacobians.png`` and a final JSON line.
Run: ``python examples/seed_jacobians.py [--quick] [--out DIR] [--data DIR]``.
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
from _common import CROP_SIZE, base_parser, load_crop, parse_args, pyplot, save_figure


def main(argv=None):
    args = parse_args(base_parser(__doc__), argv)
    t_start = time.perf_counter()
    n_seeds, n_steps, n_check = (24, 10, 2) if args.quick else (384, 40, 4)
    step_mm, h = 0.5, 1e-4            # h: finite-difference step (mm)
    dtype = torch.float64

    crop = load_crop(args.data, dtype)
    A = crop["affine"]
    fld = tf.make_field(crop["sh"], A, precomputed=False)     # exact SH evaluation
    mask = tf.make_mask(crop["brain"], A)
    params = tf.resolve(crop["voxel_sizes"], step=step_mm, peak_polish=3)   # exact peaks (for the FD check)
    gen = torch.Generator().manual_seed(2)

    slab = crop["wm"].clone()
    mid = CROP_SIZE[0] // 2
    slab[:mid - 2] = False
    slab[mid + 2:] = False
    seeds = tf.random_in_mask(slab, A, 2 * n_seeds, gen).to(dtype)
    ex = torch.tensor([1.0, 0.0, 0.0], dtype=dtype)
    with torch.no_grad():
        pre = tracking.track_fixed(fld, params, seeds, ex.expand(len(seeds), 3), n_steps, mask)
    seeds = seeds[pre.accepted][:n_seeds]
    init = ex.expand(len(seeds), 3)
    with torch.no_grad():
        out = tracking.track_fixed(fld, params, seeds, init, n_steps, mask)

    t0 = time.perf_counter()
    J = tf.seed_jacobian(fld, params, seeds, init, n_steps, mask)          # (B, 2T+1, 3, 3)
    t_jac = time.perf_counter() - t0

    B = len(seeds)
    last = out.valid.sum(1) - 1
    ar = torch.arange(B)
    J_fwd, J_bwd = J[:, 0], J[ar, last]                    # endpoint Jacobians of the two halves
    s_fwd = torch.linalg.matrix_norm(J_fwd, ord=2)
    s_bwd = torch.linalg.matrix_norm(J_bwd, ord=2)
    sens = torch.stack([s_fwd, s_bwd], 1)                  # (B, 2)
    # transverse part: moving the seed along its own streamline, or reading the endpoint's motion along the
    # streamline, only slides the curve along itself (about 1 mm / mm for a fixed number of steps); the
    # spread of the bundle is the norm with both tangents projected out
    V = out.vertices
    si = out.seed_index
    t_seed = unit(V[ar, (si + 1).clamp(max=V.shape[1] - 1)] - V[ar, (si - 1).clamp(min=0)])
    t_fwd = unit(V[:, 0] - V[:, 1])
    t_bwd = unit(V[ar, last] - V[ar, (last - 1).clamp(min=0)])
    P_seed = transverse(t_seed)
    trans = torch.stack([torch.linalg.matrix_norm(transverse(t_fwd) @ J_fwd @ P_seed, ord=2),
                         torch.linalg.matrix_norm(transverse(t_bwd) @ J_bwd @ P_seed, ord=2)], 1)
    per_line = sens.max(1).values
    # sensitivity along the streamlines: spectral norm at every vertex, by step number from the seed
    along = torch.linalg.matrix_norm(J, ord=2)             # (B, 2T+1)

    # central finite differences for a few streamlines (median .. max sensitivity)
    order = torch.argsort(per_line)
    picks = order[torch.linspace(B // 2, B - 1, n_check).round().long()].tolist()
    checks = fd_check(fld, params, mask, seeds, init, n_steps, out, J, picks, h)

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "seed_jacobians.png")
    plot(png, out, per_line, sens, trans, along, n_steps)

    sv, tv = sens.flatten(), trans.flatten()
    result = dict(example="seed_jacobians", quick=args.quick, n_streamlines=B, n_steps=n_steps, step_mm=step_mm,
                  jacobian_s=round(t_jac, 2),
                  endpoint_sensitivity_median=float(sv.median()), endpoint_sensitivity_max=float(sv.max()),
                  endpoint_sensitivity_p90=float(sv.quantile(0.9)),
                  transverse_sensitivity_median=float(tv.median()),
                  transverse_sensitivity_max=float(tv.max()),
                  fraction_transverse_expanding=float((tv > 1).double().mean()),
                  fd_checks=checks, fd_max_rel_error=max(c["rel_error"] for c in checks) if checks else None,
                  wall_s=round(time.perf_counter() - t_start, 2), figure=png)
    print(f"{B} streamlines x {2 * n_steps + 1} vertices: seed_jacobian in {t_jac:.2f} s")
    print(f"endpoint sensitivity (spectral norm of d endpoint / d seed, both ends): median {float(sv.median()):.3f}, "
          f"90th percentile {float(sv.quantile(0.9)):.3f}, max {float(sv.max()):.3f}")
    print(f"transverse part (seed and endpoint tangents projected out): median {float(tv.median()):.3f}, "
          f"max {float(tv.max()):.3f}; {100 * float((tv > 1).double().mean()):.1f} % of endpoints > 1 "
          f"(neighbouring streamlines spread apart in at least one transverse direction)")
    for c in checks:
        print(f"  streamline {c['streamline']:4d} ({c['end']} end, sensitivity {c['sensitivity']:.3f}): "
              f"central FD (h={h:g} mm) relative error {c['rel_error']:.2e}")
    if not checks:
        print("  no finite-difference check possible (every candidate changed its vertex count under +-h)")
    print(f"figure: {png}")
    print(json.dumps(result))
    return 0


def unit(v):
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp(min=1e-12)


def transverse(t):
    """Projector (..., 3, 3) onto the plane orthogonal to unit tangents t (..., 3)."""
    return torch.eye(3, dtype=t.dtype) - t.unsqueeze(-1) * t.unsqueeze(-2)


def fd_check(fld, params, mask, seeds, init, n_steps, out, J, picks, h):
    """Central differences of the endpoint with the larger sensitivity, for each picked streamline; skipped
    where a perturbed streamline has a different vertex count (a termination decision flipped)."""
    eye = torch.eye(3, dtype=seeds.dtype)
    # per picked streamline: seed + h e_0, + h e_1, + h e_2, then seed - h e_0, - h e_1, - h e_2
    pert = torch.cat([seeds[b] + sgn * h * eye for b in picks for sgn in (1.0, -1.0)])   # (6 n, 3)
    dirs = init[:1].expand(len(pert), 3)
    with torch.no_grad():
        res = tracking.track_fixed(fld, params, pert, dirs, n_steps, mask)
    checks = []
    for i, b in enumerate(picks):
        rows = slice(6 * i, 6 * i + 6)
        n_ref = int(out.valid[b].sum())
        if (res.valid[rows].sum(1) != n_ref).any() or (res.seed_index[rows] != out.seed_index[b]).any():
            continue
        norms = [float(torch.linalg.matrix_norm(J[b, v], ord=2)) for v in (0, n_ref - 1)]
        v = 0 if norms[0] >= norms[1] else n_ref - 1
        plus, minus = res.vertices[rows][:3, v], res.vertices[rows][3:, v]         # (3 directions, 3)
        J_fd = ((plus - minus) / (2 * h)).T                                        # [i, k] = d x_i / d s_k
        err = float(torch.linalg.matrix_norm(J_fd - J[b, v]) / torch.linalg.matrix_norm(J[b, v]))
        checks.append(dict(streamline=int(b), end="forward" if v == 0 else "backward",
                           sensitivity=max(norms), rel_error=err))
    return checks


def plot(png, out, per_line, sens, trans, along, T):
    plt = pyplot()
    from matplotlib.collections import LineCollection

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    V, M = out.vertices.numpy(), out.valid.numpy()
    order = torch.argsort(per_line).tolist()                 # most sensitive drawn last (on top)
    segs = [V[b, M[b], :2] for b in order]
    vmax = float(per_line.quantile(0.98))
    lc = LineCollection(segs, array=per_line[order].numpy(), cmap="viridis", linewidths=0.8,
                        norm=plt.Normalize(vmin=float(per_line.min()), vmax=vmax))
    ax = axes[0]
    ax.add_collection(lc)
    ax.autoscale()
    ax.set_aspect("equal")
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    ax.set_title("streamlines coloured by endpoint sensitivity")
    fig.colorbar(lc, ax=ax, label="max endpoint ||dx/ds||_2 (clipped at 98th percentile)", extend="max")
    sv, tv = sens.flatten().numpy(), trans.flatten().numpy()
    lo, hi = min(sv.min(), tv.min()), max(sv.max(), tv.max())
    bins = np.linspace(lo, hi, 40)
    axes[1].hist(sv, bins=bins, alpha=0.6, label="full spectral norm")
    axes[1].hist(tv, bins=bins, alpha=0.6, label="transverse part")
    axes[1].legend()
    axes[1].axvline(1.0, color="k", ls="--", lw=1)
    axes[1].set_xlabel("endpoint sensitivity ||d endpoint / d seed||_2")
    axes[1].set_ylabel("endpoints")
    axes[1].set_title("histogram (both ends of every streamline)")
    # along the streamline: spectral norm by step number k from the seed (forward and backward pooled)
    sidx = out.seed_index
    k = torch.arange(along.shape[1]).unsqueeze(0) - sidx.unsqueeze(1)      # < 0 forward, > 0 backward
    ks = np.arange(0, T + 1)
    med, lo, hi = [], [], []
    for kk in ks:
        sel = out.valid & (k.abs() == kk)
        vals = along[sel]
        med.append(float(vals.median()) if vals.numel() else np.nan)
        lo.append(float(vals.quantile(0.1)) if vals.numel() else np.nan)
        hi.append(float(vals.quantile(0.9)) if vals.numel() else np.nan)
    axes[2].fill_between(ks, lo, hi, alpha=0.3, label="10-90 %")
    axes[2].plot(ks, med, "o-", ms=3, label="median")
    axes[2].set_xlabel("step number from the seed")
    axes[2].set_ylabel("||d vertex / d seed||_2")
    axes[2].set_title("sensitivity along the streamlines")
    axes[2].legend()
    fig.suptitle("Per-streamline seed Jacobians (tractfunc.seed_jacobian), corpus callosum, axial projection")
    save_figure(fig, png)


if __name__ == "__main__":
    sys.exit(main())
