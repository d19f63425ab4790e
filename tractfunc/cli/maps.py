"""``tractfunc map | sample | connectome | sift2``: tractogram -> data on the command line (:mod:`tractfunc.maps`),
with MRtrix3's option names (tckmap, tcksample, tck2connectome, tcksift2) and outputs MRtrix3 reads back (NIfTI,
text, CSV).
Only :mod:`tractfunc.cli.commands` imports it."""
from __future__ import annotations

import os

import numpy as np

from .. import io
from ..errors import TractfuncError



class SIFT2_DEFAULTS:
    """tcksift2 3.0.3's defaults as the parser shows them, here so that building the parser imports no torch
    (tests/cli/test_cli_tools.py checks them against :data:`tractfunc.maps.sift2.DEFAULTS`)."""
    REG_TIKHONOV, REG_TV, MIN_TD_FRAC, MIN_ITERS, MAX_ITERS = 0.0, 0.1, 0.10, 10, 1000
    MAX_COEFF_STEP, MIN_CF_DECREASE = 1.0, 2.5e-5

def load_tracks(path: str):
    """The tractogram at ``path`` (.tck/.trk/.trx) as a :class:`tractfunc.TrackFile`; an empty one is an error."""
    from ..io.tractogram import load_tractogram
    tf = load_tractogram(path)
    if len(tf.lengths) == 0:
        raise TractfuncError(f"{path}: tractogram holds no streamline; expected at least one")
    return tf


def read_weights(path: str, n: int) -> np.ndarray:
    """Per-streamline weights (tck_weights_in: numbers separated by white space or commas, '#' comments) -> (n,)
    float64; a count other than ``n`` or a non-finite value is a one-line error."""
    if not os.path.exists(path):
        raise TractfuncError(f"{path}: no such file")
    try:
        with open(path) as fh:
            text = " ".join(line.split("#", 1)[0].replace(",", " ") for line in fh)
        w = np.array([float(x) for x in text.split()], dtype=np.float64)
    except (ValueError, UnicodeDecodeError) as e:
        raise TractfuncError(f"{path}: cannot be read as streamline weights ({e})") from None
    if w.size != n:
        raise TractfuncError(f"{path}: {w.size} weights for {n} streamlines; expected one weight per streamline")
    if not np.isfinite(w).all():
        raise TractfuncError(f"{path}: {int((~np.isfinite(w)).sum())} weights are NaN/Inf; expected finite weights")
    return w


def step_size(tf) -> float:
    """The tractogram's header step size (mm), NaN when absent (tckmap then does not upsample)."""
    try:
        return float(tf.header.get("step_size", "nan"))
    except ValueError:
        return float("nan")


def header_of(path: str):
    """The nibabel header of a NIfTI template (kept in the output), None for .mif."""
    from ..io import mif
    if mif.is_mif(path):
        return None
    import nibabel as nib
    return nib.load(path).header


def cmd_map(a) -> int:
    import torch
    from ..maps import density
    if a.precise and a.ends_only:
        raise TractfuncError("--precise and --ends-only are mutually exclusive (as in tckmap)")
    tf = load_tracks(a.tracks)
    data, A, vox = io.read_image(a.template)
    w = read_weights(a.tck_weights_in, len(tf.lengths)) if a.tck_weights_in else None
    mode = "length" if a.precise else "ends" if a.ends_only else "count"
    out = density((torch.from_numpy(tf.vertices), torch.from_numpy(tf.lengths)), A, data.shape[:3], mode=mode,
                  dec=a.dec, weights=None if w is None else torch.from_numpy(w), step_size=step_size(tf),
                  upsample=a.upsample, spacing=vox).numpy()
    integer = mode != "length" and not a.dec and w is None   # tckmap's default datatype
    out = out.astype(np.uint32 if integer else np.float32)
    io.save_nifti(a.output, out, A, vox, descrip=f"tractfunc map ({mode}{', dec' if a.dec else ''})",
                  reference_header=header_of(a.template))
    if not a.quiet:
        print(f"{a.output}: {mode} density of {len(tf.lengths)} streamlines on {'x'.join(map(str, data.shape[:3]))} "
              f"voxels{' (DEC)' if a.dec else ''}; {int(np.count_nonzero(out))} non-zero values")
    return 0


def write_text(path: str, rows, header: str = "", fmt: str = "%.10g", delimiter: str = " ") -> None:
    """A text matrix/vector MRtrix3 reads (``# header`` line, then rows), written atomically."""
    from ..io.atomic import atomic_path
    arr = np.atleast_2d(np.asarray(rows))
    with atomic_path(path) as tmp:
        np.savetxt(tmp, arr, fmt=fmt, delimiter=delimiter, header=header, comments="# ")


def cmd_sample(a) -> int:
    import torch
    from ..maps.sample import sample_stat, sample_vertices
    tf = load_tracks(a.tracks)
    data, A, _ = io.read_image(a.image)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise TractfuncError(f"{a.image}: image has shape {data.shape}; expected a 3-D scalar image")
    img = torch.from_numpy(np.asarray(data, dtype=np.float32))    # tcksample samples float32 images
    tracks = (torch.from_numpy(tf.vertices), torch.from_numpy(tf.lengths))
    interp = "nearest" if a.nointerp else "linear"
    header = f"tractfunc sample{' --stat-tck ' + a.stat_tck if a.stat_tck else ''}: {a.image} along {a.tracks}"
    if a.stat_tck:
        vals = sample_stat(tracks, img, A, a.stat_tck, interp).numpy()
        write_text(a.output, vals[None, :], header=header)
    else:   # one line of vertex values per streamline, as tcksample without -stat_tck
        from ..io.atomic import atomic_path
        vals = sample_vertices(tracks, img, A, interp).numpy()
        with atomic_path(a.output) as tmp, open(tmp, "w") as fh:
            fh.write(f"# {header}\n")
            for row in np.split(vals, np.cumsum(tf.lengths)[:-1]):
                fh.write(" ".join(f"{x:.9g}" for x in row) + "\n")
    if not a.quiet:
        what = a.stat_tck or "vertex values"
        print(f"{a.output}: {what} of {a.image} along {len(tf.lengths)} streamlines")
    return 0


def delimiter(path: str) -> str:
    """MRtrix3's matrix delimiter for a file name: ',' for .csv, tab for .tsv, else a space."""
    low = path.lower()
    return "," if low.endswith(".csv") else "\t" if low.endswith(".tsv") else " "


def cmd_connectome(a) -> int:
    import torch
    from ..maps.connectome import assign, connectome
    if a.assignment_end_voxels and a.search_radius is not None:
        raise TractfuncError("--assignment-end-voxels and --assignment-radial-search are mutually exclusive")
    tf = load_tracks(a.tracks)
    data, A, _ = io.read_image(a.nodes)
    w = read_weights(a.tck_weights_in, len(tf.lengths)) if a.tck_weights_in else None
    mode = "end_voxels" if a.assignment_end_voxels else "radial"
    radius = 4.0 if a.search_radius is None else a.search_radius
    tracks = (torch.from_numpy(tf.vertices), torch.from_numpy(tf.lengths))
    try:
        M = connectome(tracks, torch.from_numpy(np.asarray(data)), A, assignment=mode, radius=radius,
                       weights=None if w is None else torch.from_numpy(w), scale_length=a.scale_length,
                       scale_invlength=a.scale_invlength, scale_invnodevol=a.scale_invnodevol, stat_edge=a.stat_edge,
                       symmetric=a.symmetric, zero_diagonal=a.zero_diagonal,
                       keep_unassigned=a.keep_unassigned).numpy()
    except TractfuncError as e:
        raise TractfuncError(f"{a.nodes}: {e}") from None
    write_text(a.output, M, fmt="%.17g", delimiter=delimiter(a.output))
    pairs = None
    if a.out_assignments:
        pairs = assign(tracks, torch.from_numpy(np.asarray(data)), A, mode, radius).numpy()
        write_text(a.out_assignments, pairs, header=f"tractfunc connectome: node pair of each streamline of {a.tracks}",
                   fmt="%d")
    if not a.quiet:
        print(f"{a.output}: {M.shape[0]} x {M.shape[1]} connectome from {len(tf.lengths)} streamlines "
              f"({mode}{f' {radius:g} mm' if mode == 'radial' else ''})")
    return 0


def cmd_sift2(a) -> int:
    import torch
    from ..maps.fixels import map_streamlines, segment
    from ..maps.sift2 import sift2
    if a.min_factor is not None and a.min_coeff is not None:
        raise TractfuncError("--min-factor and --min-coeff are mutually exclusive (as in tcksift2)")
    if a.max_factor is not None and a.max_coeff is not None:
        raise TractfuncError("--max-factor and --max-coeff are mutually exclusive (as in tcksift2)")
    if a.output.lower().endswith(".tck"):
        raise TractfuncError(f"{a.output}: the output of sift2 is a text file of weights, not a tractogram")
    tf = load_tracks(a.tracks)
    fod, A, vox = io.read_image(a.fod)
    if fod.ndim != 4:
        raise TractfuncError(f"{a.fod}: image has shape {fod.shape}; expected a 4-D SH (FOD) image")
    mask = None
    if a.proc_mask:
        mask, _, _ = io.read_image(a.proc_mask)
        mask = np.asarray(mask, dtype=np.float64)
        if mask.ndim == 4 and mask.shape[3] == 1:
            mask = mask[..., 0]
        if mask.shape != fod.shape[:3]:
            raise TractfuncError(f"{a.proc_mask}: processing mask has shape {mask.shape}; expected the FOD's grid "
                                 f"{fod.shape[:3]}")
        mask = np.where(np.isfinite(mask), mask, 0.0)
    min_coeff = a.min_coeff if a.min_coeff is not None else np.log(a.min_factor) if a.min_factor else -np.inf
    max_coeff = a.max_coeff if a.max_coeff is not None else (np.log(a.max_factor) if a.max_factor is not None
                                                             else np.inf)
    fx = segment(np.asarray(fod, dtype=np.float32), A, mask, spacing=vox)
    con = map_streamlines((torch.from_numpy(tf.vertices), torch.from_numpy(tf.lengths)), fx,
                          step_size=step_size(tf))
    res = sift2(fixels=fx, contributions=con, reg_tikhonov=a.reg_tikhonov, reg_tv=a.reg_tv,
                min_td_frac=a.min_td_frac, min_iters=a.min_iters, max_iters=a.max_iters, min_coeff=min_coeff,
                max_coeff=max_coeff, max_coeff_step=a.max_coeff_step, min_cf_decrease=a.min_cf_decrease)
    header = f"tractfunc sift2: streamline weights of {a.tracks} fitted to {a.fod}"
    write_text(a.output, res.weights.numpy()[None, :], header=header)
    if a.out_coeffs:
        write_text(a.out_coeffs, res.coeffs.numpy()[None, :], header=header.replace("weights", "coefficients"))
    if a.out_mu:
        from ..io.atomic import atomic_path
        with atomic_path(a.out_mu) as tmp, open(tmp, "w") as fh:
            fh.write(f"{res.mu:.10g}\n")
    if not a.quiet:
        print(f"{a.output}: SIFT2 weights of {len(tf.lengths)} streamlines ({fx.voxel.numel()} fixels, "
              f"{len(res.cost) - 1} iterations, cost {float(res.cost[0]):.6g} -> {float(res.cost[-1]):.6g}, "
              f"mu {res.mu:.6g})")
    return 0


def add_parsers(sub, add_force) -> None:
    """Register ``map``, ``sample``, ``connectome`` and ``sift2`` on the subcommand table ``sub``."""
    m = _parser(sub, "map", "track density image on a template grid (tckmap -template equivalent)", EXAMPLES_MAP)
    m.add_argument("output", help="output image (.nii or .nii.gz)")
    m.add_argument("--template", required=True, help="image whose grid the map is on (NIfTI or .mif)")
    m.add_argument("--precise", action="store_true", help="streamline length in each voxel, mm (tckmap -precise)")
    m.add_argument("--ends-only", action="store_true", help="map only the streamline endpoints (tckmap -ends_only)")
    m.add_argument("--dec", action="store_true", help="directionally-encoded colour, 3 volumes (tckmap -dec)")
    m.add_argument("--tck-weights-in", help="text file of per-streamline weights (tckmap -tck_weights_in)")
    m.add_argument("--upsample", type=int, help="upsampling ratio (default: tckmap's, from the step size)")
    _finish(m, add_force, cmd_map)
    s = _parser(sub, "sample", "statistic of an image along each streamline (tcksample -stat_tck equivalent)",
                EXAMPLES_SAMPLE)
    s.add_argument("image", help="scalar image sampled (NIfTI or .mif), on its own grid")
    s.add_argument("output", help="output text file: one value per streamline on one line with --stat-tck, else "
                                  "one line of vertex values per streamline (as tcksample)")
    s.add_argument("--stat-tck", choices=["mean", "median", "min", "max"],
                   help="per-streamline statistic (mean: length-weighted, as tcksample); without it, one line of "
                        "vertex values per streamline")
    s.add_argument("--nointerp", action="store_true", help="nearest voxel instead of trilinear (tcksample -nointerp)")
    _finish(s, add_force, cmd_sample)
    c = _parser(sub, "connectome", "endpoint connectome from a parcellation (tck2connectome equivalent)",
                EXAMPLES_CONNECTOME)
    c.add_argument("nodes", help="parcellation image of integer node labels, 0 = none (NIfTI or .mif)")
    c.add_argument("output", help="output matrix (.csv: comma-separated, .tsv: tabs, else spaces; as tck2connectome)")
    c.add_argument("--assignment-end-voxels", action="store_true",
                   help="node = label of the voxel holding each end (tck2connectome -assignment_end_voxels)")
    c.add_argument("--assignment-radial-search", type=float, metavar="MM", dest="search_radius",
                   help="nearest labelled voxel within this distance of each end (default: this, 4 mm)")
    c.add_argument("--scale-length", action="store_true", help="scale each contribution by the streamline length")
    c.add_argument("--scale-invlength", action="store_true", help="scale each contribution by the inverse length")
    c.add_argument("--stat-edge", default="sum", choices=["sum", "mean", "min", "max"],
                   help="statistic of each edge's contributions (default sum; mean: weighted by the streamline "
                        "weights; min / max: unweighted, NaN where no streamline)")
    c.add_argument("--scale-invnodevol", action="store_true",
                   help="scale each contribution by the inverse of the two nodes' mean volume")
    c.add_argument("--symmetric", action="store_true", help="mirror the upper triangle on output")
    c.add_argument("--zero-diagonal", action="store_true", help="set the diagonal to zero on output")
    c.add_argument("--keep-unassigned", action="store_true", help="keep node 0 (unassigned ends) as first row/column")
    c.add_argument("--tck-weights-in", help="text file of per-streamline weights (tck2connectome -tck_weights_in)")
    c.add_argument("--out-assignments", help="write the node pair of each streamline (text, one pair a line)")
    _finish(c, add_force, cmd_connectome)
    S = SIFT2_DEFAULTS
    f = _parser(sub, "sift2", "per-streamline weights fitting track density to fixel FOD integrals (tcksift2 "
                              "equivalent)", EXAMPLES_SIFT2)
    f.add_argument("fod", help="FOD image: SH coefficients, MRtrix3 basis (NIfTI or .mif)")
    f.add_argument("output", help="output text file of per-streamline weights (tckmap / tck2connectome "
                                  "-tck_weights_in read it)")
    f.add_argument("--proc-mask", help="processing-mask weights on the FOD grid (tcksift2 -proc_mask; default 1 "
                                       "where the FOD is non-zero)")
    f.add_argument("--out-mu", help="write the proportionality coefficient mu (text)")
    f.add_argument("--out-coeffs", help="write the per-streamline coefficients log(weight) (text)")
    f.add_argument("--reg-tikhonov", type=float, default=S.REG_TIKHONOV,
                   help=f"Tikhonov regularisation of the coefficients (default {S.REG_TIKHONOV})")
    f.add_argument("--reg-tv", type=float, default=S.REG_TV,
                   help=f"total-variation regularisation along each streamline (default {S.REG_TV})")
    f.add_argument("--min-td-frac", type=float, default=S.MIN_TD_FRAC,
                   help=f"exclude fixels reconstructed below this fraction of their FOD integral "
                        f"(default {S.MIN_TD_FRAC})")
    f.add_argument("--min-iters", type=int, default=S.MIN_ITERS, help=f"minimum iterations (default {S.MIN_ITERS})")
    f.add_argument("--max-iters", type=int, default=S.MAX_ITERS, help=f"maximum iterations (default {S.MAX_ITERS})")
    f.add_argument("--min-factor", type=float, help="minimum weight; below it a streamline gets weight 0")
    f.add_argument("--min-coeff", type=float, help="minimum coefficient (log weight); exclusive with --min-factor")
    f.add_argument("--max-factor", type=float, help="maximum weight of any streamline")
    f.add_argument("--max-coeff", type=float, help="maximum coefficient (log weight); exclusive with --max-factor")
    f.add_argument("--max-coeff-step", type=float, default=S.MAX_COEFF_STEP,
                   help=f"largest change of a coefficient per iteration (default {S.MAX_COEFF_STEP})")
    f.add_argument("--min-cf-decrease", type=float, default=S.MIN_CF_DECREASE,
                   help=f"stop when an iteration lowers the cost by less than this fraction of the initial cost "
                        f"(default {S.MIN_CF_DECREASE})")
    _finish(f, add_force, cmd_sift2)


def _parser(sub, name: str, what: str, examples: str):
    """A subcommand reading a tractogram (its first positional argument)."""
    import argparse
    p = sub.add_parser(name, help=what, epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tracks", help="input tractogram (.tck, .trk or .trx)")
    return p


def _finish(p, add_force, func) -> None:
    """The options every maps command ends with (--quiet, --force) and its handler."""
    p.add_argument("--quiet", action="store_true", help="no summary line")
    add_force(p)
    p.set_defaults(func=func)


EXAMPLES_SIFT2 = """examples:
  tractfunc sift2 tracks.tck fod.nii.gz sift2_weights.txt
  tractfunc sift2 tracks.tck fod.nii.gz sift2_weights.txt --proc-mask wm.nii.gz --out-mu mu.txt --reg-tv 0.1
"""

EXAMPLES_CONNECTOME = """examples:
  tractfunc connectome tracks.tck parcels.nii.gz connectome.csv
  tractfunc connectome tracks.tck parcels.nii.gz connectome.csv --tck-weights-in sift2.txt --symmetric --zero-diagonal
  tractfunc connectome tracks.tck parcels.nii.gz connectome.csv --assignment-end-voxels --out-assignments pairs.txt
"""

EXAMPLES_SAMPLE = """examples:
  tractfunc sample tracks.tck fa.nii.gz mean_fa.txt --stat-tck mean
  tractfunc sample tracks.tck fa.nii.gz min_fa.txt --stat-tck min --nointerp
"""

EXAMPLES_MAP = """examples:
  tractfunc map tracks.tck tdi.nii.gz --template fa.nii.gz
  tractfunc map tracks.tck length.nii.gz --template fa.nii.gz --precise --tck-weights-in sift2_weights.txt
  tractfunc map tracks.tck dec.nii.gz --template fa.nii.gz --dec
"""
