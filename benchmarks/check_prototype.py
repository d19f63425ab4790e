"""Check that benchmarks/prototype_compact_grad.py changes nothing but memory and time: same forward
(bit for bit) and the same gradients (to rounding) as the library, on a few Philips streamlines, with
gradients wrt the seeds and the FOD (the prototype's IFT graft) and wrt the seeds only (also its compact
sampler).

    python benchmarks/check_prototype.py [--data DIR] [--n 48] [--steps 8]

About a minute on one core.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from tractfunc.core import field, params as P, seeds as S
from tractfunc import io
from tractfunc.sdstream import tracking  # noqa: E402
import prototype_compact_grad as pc  # noqa: E402
from grad_memory import DEFAULT_DATA  # noqa: E402


def run(data, dtype, ckpt, proto, n, steps, fod_grad=True):
    """(vertices, valid, seed gradient, FOD gradient or None) of a short ``track_fixed`` run and its loss."""
    (pc.install if proto else pc.uninstall)()
    img = io.load_fod(os.path.join(data, "dwi_fod_lmax8.nii.gz"))
    sm = io.load_mask(os.path.join(data, "dwi_wmmask_FA0.3.nii.gz"))
    bm = io.load_mask(os.path.join(data, "dwi_brainmask.nii.gz"))
    msk = field.make_mask(torch.as_tensor(bm.data), bm.affine)
    prm = P.resolve(img.voxel_sizes)
    fld = field.make_field(torch.as_tensor(img.data, dtype=dtype), img.affine)
    if fod_grad:
        fld = fld._replace(sh=fld.sh.requires_grad_())
    g = torch.Generator().manual_seed(1)
    seeds = S.random_in_mask(torch.as_tensor(sm.data), sm.affine, n, g).to(dtype).requires_grad_()
    dirs = tracking.random_directions(n, g, dtype)
    out = tracking.track_fixed(fld, prm, seeds, dirs, steps, mask=msk, checkpoint=ckpt)
    (torch.where(out.valid[..., None], out.vertices, 0) ** 2).sum().backward()
    return out.vertices.detach(), out.valid, seeds.grad, fld.sh.grad


def sampler_check(data):
    """The sampler alone, FOD without gradient (the prototype's compact path), at points with a corner
    weight below MRtrix's 1e-6 cutoff (offsets of 1e-7 voxel from voxel centres), where the library's
    derivative rule for dropped weights matters."""
    img = io.load_fod(os.path.join(data, "dwi_fod_lmax8.nii.gz"))
    sm = io.load_mask(os.path.join(data, "dwi_wmmask_FA0.3.nii.gz"))
    A = torch.as_tensor(img.affine, dtype=torch.float64)
    vox = torch.nonzero(torch.as_tensor(sm.data))[:64].to(torch.float64)
    g = torch.Generator().manual_seed(2)
    vox = vox + torch.where(torch.rand(vox.shape, generator=g) < 0.5, 1e-7, 0.3)
    pos = vox @ A[:3, :3].T + A[:3, 3]
    w = torch.randn(pos.shape[0], 45, generator=g, dtype=torch.float64)
    out = []
    for proto in (False, True):
        (pc.install if proto else pc.uninstall)()
        fld = field.make_field(torch.as_tensor(img.data, dtype=torch.float64), img.affine)
        p = pos.clone().requires_grad_()
        s = fld.sample(p)
        (s.values * w).sum().backward()
        out.append((s.values.detach(), p.grad))
    pc.uninstall()
    (a_v, a_p), (b_v, b_p) = out
    rel_p = float((a_p - b_p).abs().max() / a_p.abs().max())
    good = torch.equal(a_v, b_v) and rel_p < 1e-12
    print(f"sampler at 1e-7-voxel offsets (float64): values identical {torch.equal(a_v, b_v)}; max rel. "
          f"difference of d/dpos {rel_p:.1e} -> {'ok' if good else 'MISMATCH'}")
    return good


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ok = sampler_check(args.data)
    for dtype, ckpt, tol, fod_grad in ((torch.float64, 0, 1e-12, True), (torch.float64, 4, 1e-12, True),
                                       (torch.float32, 4, 1e-5, True), (torch.float64, 0, 1e-12, False),
                                       (torch.float32, 4, 1e-5, False)):
        a = run(args.data, dtype, ckpt, False, args.n, args.steps, fod_grad)
        b = run(args.data, dtype, ckpt, True, args.n, args.steps, fod_grad)
        same = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        rel = [float((y - x).abs().max() / x.abs().max()) if x is not None else 0.0 for x, y in zip(a[2:], b[2:])]
        good = same and max(rel) < tol
        ok &= good
        fod = f", of the FOD gradient {rel[1]:.1e}" if fod_grad else " (FOD without gradient)"
        print(f"{str(dtype):14s} checkpoint={ckpt}: forward identical {same}; max rel. difference of the "
              f"seed gradient {rel[0]:.1e}{fod} -> {'ok' if good else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
