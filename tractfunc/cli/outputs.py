"""The files each command reads and writes, and the checks made on them before any work starts.

tckgen's rule for every command that writes: an existing output is an error unless ``--force`` is given; an
output that is one of the inputs (the same file, by any path) is an error even with ``--force``; an output must
be a file path in an existing folder that can be written.  The writes themselves are atomic
(:mod:`tractfunc.io.atomic`), so a failure never leaves a partial file or destroys the old one.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Tuple

from ..errors import TractfuncError
from ..io.atomic import extension

# command -> (input options, output options): Namespace attribute names (None / "-" values are skipped)
FILES = {
    "track": (("fod", "seed_image", "seed_points", "seed_directions", "mask", "fa_map", "seed_rejection", "seed_gmwmi", "act"),
              ("output", "output_seeds")),
    "convert": (("input", "reference"), ("output",)),
    "fod": (("dwi", "bval", "bvec", "mask", "response"), ("output",)),
    "render": (("tractogram", "background"), ("output",)),
    "info": (("files",), ("json",)),
    "bench": (("fod", "seed_image", "mask"), ("json",)),
    "parity": (("fod", "seed_image", "mask"), ()),
    "demo": ((), ()),
    "5tt2gmwmi": (("input", "mask"), ("output",)),
    "map": (("tracks", "template", "tck_weights_in"), ("output",)),
    "sample": (("tracks", "image", "tck_weights_in"), ("output",)),
    "connectome": (("tracks", "nodes", "tck_weights_in"), ("output", "out_assignments")),
    "sift2": (("tracks", "fod", "proc_mask"), ("output", "out_mu", "out_coeffs")),
}
# output option -> extensions it accepts (the writer is chosen by extension)
EXTENSIONS = {("track", "output"): (".tck", ".trk", ".trx"), ("convert", "output"): (".tck", ".trk", ".trx"),
              ("fod", "output"): (".nii", ".nii.gz"), ("5tt2gmwmi", "output"): (".nii", ".nii.gz"),
              ("render", "output"): (".png",), ("map", "output"): (".nii", ".nii.gz")}


def demo_outputs(folder: str) -> List[str]:
    """The files ``tractfunc demo --out FOLDER`` writes."""
    return [os.path.join(folder, n) for n in ("phantom_fod.nii.gz", "phantom_mask.nii.gz", "phantom.tck",
                                              "phantom.png")]


_POSITIONAL = {"fod", "output", "input", "tractogram", "dwi", "bval", "bvec", "files", "tracks", "image", "nodes"}


def _label(name: str) -> str:
    """How the usage line names an argument: ``OUTPUT`` for a positional, ``--output-seeds`` for an option."""
    return name.upper() if name in _POSITIONAL else "--" + name.replace("_", "-")


def _paths(a: argparse.Namespace, names) -> List[Tuple[str, str]]:
    out = []
    for name in names:
        v = getattr(a, name, None)
        for p in (v if isinstance(v, list) else [v]):
            if p is not None and p != "-":
                out.append((name, os.fspath(p)))
    return out


def _same(p: str, q: str) -> bool:
    try:
        if os.path.exists(p) and os.path.exists(q):
            return os.path.samefile(p, q)
    except OSError:
        pass
    return os.path.realpath(p) == os.path.realpath(q)


def check_output(path: str, what: str, force: bool) -> None:
    """One output file: a path to a file (not a folder) in an existing folder that can be written; an existing
    file only with ``force``.  Raises a one-line :class:`TractfuncError`."""
    if not path or path.endswith(os.sep):
        raise TractfuncError(f"{what} {path!r}: expected a file name")
    if os.path.isdir(path):
        raise TractfuncError(f"{path}: is a folder; expected a file name for {what}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise TractfuncError(f"{path}: folder {folder} does not exist; expected an existing folder for {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TractfuncError(f"{path}: cannot write in folder {folder} (no permission, or a read-only file system)")
    if os.path.lexists(path) and not force:
        raise TractfuncError(f"{path}: already exists; use --force to overwrite it (as tckgen -force)")


def check(a: argparse.Namespace) -> None:
    """Every output of command ``a.cmd`` against :func:`check_output`, the extension table, the inputs and the
    other outputs; a one-line :class:`TractfuncError` for the first problem, before any work starts."""
    cmd = a.cmd
    ins, outs = FILES.get(cmd, ((), ()))
    inputs, outputs = _paths(a, ins), _paths(a, outs)
    if cmd == "demo":
        outputs = [("out", p) for p in demo_outputs(a.out)]
        if os.path.exists(a.out) and not os.path.isdir(a.out):
            raise TractfuncError(f"--out {a.out}: is a file; expected a folder (created if absent)")
        if not os.path.isdir(a.out):
            parent = os.path.dirname(os.path.abspath(a.out))
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
                raise TractfuncError(f"--out {a.out}: cannot be created in {parent}")
            return
    force = bool(getattr(a, "force", False))
    for name, path in outputs:
        what = _label(name)
        if os.path.isdir(path):
            raise TractfuncError(f"{path}: is a folder; expected a file name for {what}")
        exts = EXTENSIONS.get((cmd, name))
        if exts and extension(path).lower() not in exts:
            raise TractfuncError(f"{path}: unknown extension for {what}; expected {', '.join(exts)}")
        for iname, ipath in inputs:
            if _same(path, ipath):
                raise TractfuncError(f"{path}: {what} is also the input {_label(iname)}; expected a different "
                                     "output file (not even --force overwrites an input)")
        check_output(path, what, force)
    for i, (n1, p1) in enumerate(outputs):
        for n2, p2 in outputs[i + 1:]:
            if _same(p1, p2):
                raise TractfuncError(f"{p1}: given as both {_label(n1)} and {_label(n2)}; expected two "
                                     "different files")
