"""Throughput of tractfunc on one device (written for a GPU; runs on CPU too): forward tracking, eager and
with the Newton move compiled, and forward + backward through the fixed-shape tracker.

    python benchmarks/gpu.py --data DIR --device cuda --sizes 100000,1000000 --json gpu.json

DIR holds the Philips inputs (dwi_fod_lmax8.nii.gz, dwi_brainmask.nii.gz, dwi_wmmask_FA0.3.nii.gz).
Every section prints one line as it finishes and the JSON is rewritten after each, so a run cut short
keeps what it measured.  Ratios are against tckgen's measured 2-core throughput (``--tckgen-vps``,
from docs/benchmarks.md; tckgen is not installed on the GPU machine).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tractfunc.core import field as F, params as P, seeds as S
from tractfunc import io  # noqa: E402
from tractfunc.core.seeds import random_directions
from tractfunc.sdstream.fixed import track_fixed
from tractfunc.sdstream.track import track  # noqa: E402

RESULTS: dict = {}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def save(path):
    if path:
        with open(path, "w") as fh:
            json.dump(RESULTS, fh, indent=1)


def inputs(data, dev, dtype):
    fod = io.load_fod(os.path.join(data, "dwi_fod_lmax8.nii.gz"))
    m = io.load_mask(os.path.join(data, "dwi_brainmask.nii.gz"))
    wm = io.load_mask(os.path.join(data, "dwi_wmmask_FA0.3.nii.gz"))
    prm = P.resolve(fod.voxel_sizes)
    fld = F.make_field(torch.as_tensor(fod.data, dtype=dtype, device=dev), fod.affine)
    msk = F.make_mask(torch.as_tensor(m.data, device=dev), m.affine)
    return prm, fld, msk, wm


def draw(wm, n, seed, dev, dtype):
    g = torch.Generator().manual_seed(seed)
    pts = S.random_in_mask(torch.as_tensor(wm.data), wm.affine, n, g)
    dirs = random_directions(n, g, torch.float64)
    return pts.to(dev, dtype), dirs.to(dev, dtype)


def forward(prm, fld, msk, pts, dirs, compiled):
    dev = pts.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    t = time.perf_counter()
    res = track(fld, prm, pts, dirs, mask=msk, chunk_size=pts.shape[0], compiled=compiled, engine="eager")
    sync(dev)
    dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return res, dt, peak


def check_against_cpu(prm, fld, msk, wm, n, dev, a):
    """Same seeds on the device and on the CPU (float32): how many streamlines agree."""
    pts, dirs = draw(wm, n, 11, dev, torch.float32)
    cprm, cfld, cmsk, _ = inputs(a.data, torch.device("cpu"), torch.float32)
    out = {}
    ref = track(cfld, cprm, pts.cpu(), dirs.cpu(), mask=cmsk)
    for compiled in (False, True):
        res = track(fld, prm, pts, dirs, mask=msk, compiled=compiled, engine="eager")
        a_ids, b_ids = ref.seed_ids.tolist(), res.seed_ids.cpu().tolist()
        ra, rb = ref.streamlines(), [x.cpu() for x in res.streamlines()]
        la, lb = dict(zip(a_ids, ra)), dict(zip(b_ids, rb))
        common = sorted(set(a_ids) & set(b_ids))
        d = []
        for i in common:
            x, y = la[i].double(), lb[i].double()
            dd = torch.cdist(x, y)
            d.append(max(dd.min(1).values.max().item(), dd.min(0).values.max().item()))
        d = np.array(d)
        same = sum(bool(torch.equal(la[i], lb[i])) for i in common)
        out["compiled" if compiled else "eager"] = dict(
            cpu_streamlines=len(a_ids), device_streamlines=len(b_ids), common=len(common),
            bit_identical=int(same), within_0p1mm=float((d < 0.1).mean()) if len(d) else None,
            within_1mm=float((d < 1.0).mean()) if len(d) else None)
        print(f"[check] {'compiled' if compiled else 'eager'}: cpu {len(a_ids)} vs {dev.type} {len(b_ids)} streamlines, "
              f"{same}/{len(common)} bit-identical, {100 * out['compiled' if compiled else 'eager']['within_1mm']:.2f}% within 1 mm",
              flush=True)
    return out


def grad_run(prm, fld, msk, wm, n, steps, ckpt, dev):
    pts, dirs = draw(wm, n, 13, dev, torch.float32)
    sh = fld.sh.detach().clone().requires_grad_(True)
    seeds = pts.clone().requires_grad_(True)
    f2 = fld._replace(sh=sh)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    t0 = time.perf_counter()
    out = track_fixed(f2, prm, seeds, dirs, steps, mask=msk, checkpoint=ckpt)
    loss = (out.vertices * out.weights.unsqueeze(-1)).sum() / n
    sync(dev)
    t1 = time.perf_counter()
    loss.backward()
    sync(dev)
    t2 = time.perf_counter()
    nv = int(out.valid.sum())
    finite = bool(torch.isfinite(sh.grad).all()) and bool(torch.isfinite(seeds.grad).all())
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return dict(seeds=n, steps_per_half=steps, checkpoint=ckpt, forward_s=t1 - t0, backward_s=t2 - t1,
                valid_vertices=nv, vertices_per_s_fwd_bwd=nv / (t2 - t0), grads_finite=finite,
                peak_gpu_bytes=peak)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="100000,1000000", help="streamlines wanted per forward run")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--check", type=int, default=2000, help="seeds for the device-vs-CPU check (0: skip)")
    ap.add_argument("--grad-sizes", default="100000", help="seeds per forward+backward run ('' to skip)")
    ap.add_argument("--grad-steps", type=int, default=200)
    ap.add_argument("--checkpoint", type=int, default=10)
    ap.add_argument("--accept-rate", type=float, default=0.72, help="seeds drawn = streamlines wanted / this")
    ap.add_argument("--tckgen-vps", type=float, default=668165.0,
                    help="tckgen 3.0.3 vertices/s on 2 cores (docs/benchmarks.md)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    RESULTS["machine"] = dict(torch=torch.__version__, python=platform.python_version(), device=str(dev),
                              name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
                              cpu_threads=torch.get_num_threads())
    print(RESULTS["machine"], flush=True)
    prm, fld, msk, wm = inputs(a.data, dev, torch.float32)
    RESULTS["forward"] = []
    RESULTS["forward_backward"] = []
    for name, section in (("forward eager", lambda: forward_section(a, prm, fld, msk, wm, dev, "eager")),
                          ("forward+backward", lambda: grad_section(a, prm, fld, msk, wm, dev)),
                          ("forward compiled", lambda: forward_section(a, prm, fld, msk, wm, dev, "compiled")),
                          ("check", lambda: check_section(a, prm, fld, msk, wm, dev))):
        try:
            section()
        except Exception as e:   # keep what the other sections measure
            RESULTS.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {e}"[:2000])
            print(f"[{name}] FAILED: {type(e).__name__}: {str(e)[:500]}", flush=True)
        save(a.json)


def check_section(a, prm, fld, msk, wm, dev):
    if a.check:
        RESULTS["check_vs_cpu"] = check_against_cpu(prm, fld, msk, wm, a.check, dev, a)


def forward_section(a, prm, fld, msk, wm, dev, mode):
    if mode in a.modes.split(","):
        compiled = mode == "compiled"
        pts, dirs = draw(wm, 4000, 1, dev, torch.float32)
        t = time.perf_counter()
        forward(prm, fld, msk, pts, dirs, compiled)   # warm-up (and compilation)
        warm = time.perf_counter() - t
        for want in [int(x) for x in a.sizes.split(",") if x]:
            n = int(math.ceil(want / a.accept_rate))
            pts, dirs = draw(wm, n, 2, dev, torch.float32)
            res, dt, peak = forward(prm, fld, msk, pts, dirs, compiled)
            nv = int(res.lengths.sum())
            row = dict(mode=mode, seeds=n, streamlines=int(res.lengths.numel()), vertices=nv, wall_s=dt,
                       vertices_per_s=nv / dt, x_tckgen_2core=nv / dt / a.tckgen_vps, warmup_s=warm,
                       peak_gpu_bytes=peak)
            RESULTS["forward"].append(row)
            save(a.json)
            print(f"[forward {mode}] {n} seeds -> {row['streamlines']} streamlines, {nv} vertices in {dt:.2f} s: "
                  f"{nv / dt / 1e6:.2f} M vertices/s = {row['x_tckgen_2core']:.1f}x tckgen 2-core; "
                  f"warm-up {warm:.1f} s; peak {0 if peak is None else peak / 2**30:.2f} GiB", flush=True)
            del res


def grad_section(a, prm, fld, msk, wm, dev):
    for n in [int(x) for x in a.grad_sizes.split(",") if x]:
        grad_run(prm, fld, msk, wm, 1000, 20, a.checkpoint, dev)   # warm-up
        row = grad_run(prm, fld, msk, wm, n, a.grad_steps, a.checkpoint, dev)
        row["x_tckgen_2core"] = row["vertices_per_s_fwd_bwd"] / a.tckgen_vps
        RESULTS["forward_backward"].append(row)
        save(a.json)
        print(f"[fwd+bwd] {n} seeds x {a.grad_steps} steps/half, checkpoint {a.checkpoint}: forward "
              f"{row['forward_s']:.2f} s, backward {row['backward_s']:.2f} s, {row['valid_vertices']} vertices, "
              f"{row['vertices_per_s_fwd_bwd'] / 1e6:.2f} M vertices/s fwd+bwd = {row['x_tckgen_2core']:.1f}x tckgen "
              f"2-core; grads finite {row['grads_finite']}; peak "
              f"{0 if row['peak_gpu_bytes'] is None else row['peak_gpu_bytes'] / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
