"""Shared setup of the examples/ scripts: data location, loading the Philips in-vivo crop, CLI options.

The scripts are run as ``python examples/<name>.py``, so this folder is on ``sys.path`` and they import
from here with ``from _common import ...``.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

import tractfunc as tf

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "..", "shared", "data", "dmri_invivo_philips_achieva_dti32")
CROP_START, CROP_SIZE = (48, 38, 28), (32, 24, 16)   # voxels: splenium and body of the corpus callosum


def load_crop(data_dir: str, dtype):
    """FOD SH, WM seed mask and brain mask of the crop, with the crop's affine (voxel -> scanner mm).

    Exits with status 2 and an error on stderr when the data files are missing.
    """
    names = {"fod": "dwi_fod_lmax8.nii.gz", "wm": "dwi_wmmask_FA0.3.nii.gz", "brain": "dwi_brainmask.nii.gz"}
    paths = {k: os.path.join(data_dir, v) for k, v in names.items()}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        print(f"error: real data not found: {', '.join(missing)}\n"
              f"expected the Philips in-vivo DTI set (dmri_invivo_philips_achieva_dti32) at {data_dir}; "
              f"pass --data DIR", file=sys.stderr)
        sys.exit(2)
    fod, wm, brain = tf.load_fod(paths["fod"]), tf.load_mask(paths["wm"]), tf.load_mask(paths["brain"])
    sl = tuple(slice(a, a + n) for a, n in zip(CROP_START, CROP_SIZE))
    shift = np.eye(4)
    shift[:3, 3] = CROP_START
    affine = fod.affine @ shift          # voxel (0,0,0) of the crop = voxel CROP_START of the full image
    return dict(sh=torch.as_tensor(np.ascontiguousarray(fod.data[sl]), dtype=dtype), affine=affine,
                wm=torch.as_tensor(wm.data[sl]), brain=torch.as_tensor(brain.data[sl]),
                voxel_sizes=fod.voxel_sizes)


def base_parser(doc: str) -> argparse.ArgumentParser:
    """Argument parser with the options every example takes: --quick, --out, --data, --threads.

    ``doc`` is the script's module docstring; its first line becomes the description.
    """
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced sizes (test mode, < 25 s)")
    ap.add_argument("--out", default=os.path.join(HERE, "output"))
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for these small, overhead-bound batches)")
    return ap


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (the examples only write PNG files)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, png: str) -> None:
    """Lay out ``fig``, write it to ``png`` (110 dpi) and close it."""
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    pyplot().close(fig)


def parse_args(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv`` with ``ap`` and set torch's intra-op thread count from ``--threads``."""
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args
