"""Issue 15's speed traps 1 and 3, measured (the library on PYTHONPATH; run it on two revisions for before/after).

1. A Fortran-ordered FOD leaf (``torch.from_numpy`` of the NIfTI array, ``field._replace(sh=leaf)``) against a
   C-ordered one: fixed engine, forward + backward wrt FOD and seeds, same seeds; the gradients must agree.
3. ``torch.set_num_threads(1)`` against 2 on a small batch (16 seeds x 25 steps), fixed engine, fwd + bwd.

    PYTHONPATH=. python benchmarks/grad_traps.py [--n 100] [--steps 50] [--json out.json]
"""
import argparse
import json
import os
import time

import numpy as np
import torch

import tractfunc as tf
from tractfunc import io
from tractfunc.core import seeds as S

D = "/work/shared/data/dmri_invivo_philips_achieva_dti32"


def fwd_bwd(fld, prm, leaf, seeds, dirs, mask, steps):
    s = seeds.clone().requires_grad_(True)
    t0 = time.perf_counter()
    tr = tf.track(fld._replace(sh=leaf), prm, s, dirs, mask=mask, engine="fixed", n_steps=steps,
                  gradient=tf.Checkpoint(10))
    (tr.vertices @ torch.tensor([0.48, -0.6, 0.64], dtype=s.dtype)).sum().backward()
    return time.perf_counter() - t0, tr.vertices.shape[0], leaf.grad, s.grad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    img = io.load_fod(os.path.join(D, "dwi_fod_lmax8.nii.gz"))
    wm, bm = io.load_mask(os.path.join(D, "dwi_wmmask_FA0.3.nii.gz")), io.load_mask(os.path.join(D, "dwi_brainmask.nii.gz"))
    mask = tf.make_mask(torch.as_tensor(bm.data), bm.affine, bm.voxel_sizes)
    fortran = np.asfortranarray(img.data, dtype=np.float32)
    fld = tf.make_field(torch.from_numpy(fortran), img.affine, precomputed=False, voxel_sizes=img.voxel_sizes)
    prm = tf.resolve(img.voxel_sizes, exact=True)
    g = torch.Generator().manual_seed(0)
    seeds = S.random_in_mask(torch.as_tensor(wm.data), wm.affine, a.n, g).float()
    dirs = S.random_directions(a.n, g, torch.float32)
    out = {"n": a.n, "steps": a.steps, "threads": 1, "torch": torch.__version__, "cpus": os.cpu_count()}
    res = {}
    for layout in ("C", "F"):
        best = None
        for _ in range(a.repeats):
            leaf = torch.from_numpy(fortran if layout == "F" else np.ascontiguousarray(fortran)).requires_grad_(True)
            r = fwd_bwd(fld, prm, leaf, seeds, dirs, mask, a.steps)
            best = r if best is None or r[0] < best[0] else best
        res[layout] = best
        print(f"trap 1: {layout}-ordered leaf fwd+bwd {best[0]:.2f} s, {best[1]} vertices", flush=True)
    same = torch.equal(res["C"][2], res["F"][2]) and torch.equal(res["C"][3], res["F"][3])
    out["trap1"] = {"C_seconds": res["C"][0], "F_seconds": res["F"][0], "F_over_C": res["F"][0] / res["C"][0],
                    "vertices": res["C"][1], "gradients_identical": same}
    print(f"trap 1: F / C = {res['F'][0] / res['C'][0]:.2f}, gradients identical: {same}")
    small_s, small_d = seeds[:16], dirs[:16]
    leaf_c = torch.from_numpy(np.ascontiguousarray(fortran))
    t = {}
    for th in (1, 2, 1, 2):
        torch.set_num_threads(th)
        dt = fwd_bwd(fld, prm, leaf_c.clone().requires_grad_(True), small_s, small_d, mask, 25)[0]
        t[th] = min(t.get(th, dt), dt)
        print(f"trap 3: {th} thread(s), 16 seeds x 25 steps fwd+bwd {dt:.2f} s", flush=True)
    out["trap3"] = {"one_thread_s": t[1], "two_threads_s": t[2], "two_over_one": t[2] / t[1]}
    print(f"trap 3: 2 threads / 1 thread = {t[2] / t[1]:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
