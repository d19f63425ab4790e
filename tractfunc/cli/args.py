"""argparse without guessing: no abbreviated options, each subcommand's own usage on its errors (with a hint for
tckgen-style single-dash options and near misses), and one table of the numeric options' valid ranges checked
before any work starts.
"""
from __future__ import annotations

import argparse
import difflib
import math
import sys

from ..errors import TractfuncError


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (subparsers made by ``add_subparsers`` are of this class too) that never takes
    ``--seed-direction`` for ``--seed-directions`` (``allow_abbrev=False``) and reports unknown options with the
    usage of the subcommand they were given to."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:   # a subcommand: its own usage, not the top level's
            self.error("unrecognized arguments: " + " ".join(extras))
        return ns, extras

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}{self._hint(message)}\n")

    def _hint(self, message: str) -> str:
        """' (did you mean --select?)' for an unknown '-select' or '--seed-direction', else ''."""
        if "unrecognized arguments" not in message:
            return ""
        known = [s for s in self._option_string_actions if s.startswith("--")]
        for tok in message.split(":", 1)[1].split():
            name = tok.split("=", 1)[0]
            if not name.startswith("-"):
                continue
            if not name.startswith("--") and "-" + name in known:
                return f" (options take two dashes: {'-' + name})"
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            if close:
                return f" (did you mean {close[0]}?)"
        return ""


# option -> (lowest, lowest allowed?, highest, highest allowed?, what is expected); None: no bound.
# Counts are integers; 0 keeps tckgen's meaning where tckgen has one (--select 0: no limit, --seeds 0: no
# limit, --threads 0: no extra threads).
RANGES = {
    "select": (0, True, None, False, "a number of streamlines >= 0 (0: no limit, as tckgen -select 0)"),
    "seeds": (0, True, None, False, "a number of seeds >= 0 (0: no limit, as tckgen -seeds 0)"),
    "threads": (0, True, None, False, "a number of threads >= 0 (0: no extra threads, as tckgen -nthreads 0)"),
    "workers": (1, True, None, False, "a number of processes >= 1"),
    "chunk": (1, True, None, False, "a number of seeds per batch >= 1"),
    "jobs": (1, True, None, False, "a number of processes >= 1"),
    "repeats": (1, True, None, False, "a number of runs >= 1"),
    "max_streamlines": (1, True, None, False, "a number of streamlines >= 1"),
    "maxlen": (1, True, None, False, "a number of points >= 1"),
    "max_cross": (1, True, None, False, "a number of peaks >= 1"),
    "roi_radii": (1, True, None, False, "a radius in voxels >= 1"),
    "upsample": (1, True, None, False, "an upsampling ratio >= 1"),
    "search_radius": (0.0, True, None, False, "a distance >= 0 mm"),
    "lmax": (0, True, 30, True, "an even SH order in [0, 30]"),
    "step": (0.0, False, None, False, "a positive number of mm"),
    "angle": (0.0, False, 180.0, True, "an angle in (0, 180] degrees"),
    "cutoff": (0.0, True, None, False, "an FOD amplitude >= 0"),
    "min_length": (0.0, True, None, False, "a length >= 0 mm"),
    "max_length": (0.0, False, None, False, "a positive length in mm"),
    "slab": (0.0, True, None, False, "a thickness >= 0 mm (0: everything, projected)"),
    "stop_threshold": (None, False, None, False, "a finite threshold"),
    "pmf_threshold": (0.0, True, 1.0, True, "a fraction in [0, 1]"),
    "relative_peak_threshold": (0.0, True, 1.0, True, "a fraction in [0, 1]"),
    "min_separation_angle": (0.0, True, 90.0, True, "an angle in [0, 90] degrees"),
    "fa_thr": (0.0, False, 1.0, True, "an FA in (0, 1]"),
    "tau": (0.0, True, None, False, "a fraction >= 0"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_ranges(a: argparse.Namespace) -> None:
    """Raise a one-line :class:`TractfuncError` for the first numeric option of ``a`` outside :data:`RANGES`
    (NaN and infinities included); options that are absent or None are skipped."""
    for name, (lo, lo_ok, hi, hi_ok, expected) in RANGES.items():
        v = getattr(a, name, None)
        if v is None or isinstance(v, bool):
            continue
        bad = isinstance(v, float) and not math.isfinite(v)
        bad = bad or (lo is not None and (v < lo or (v == lo and not lo_ok)))
        bad = bad or (hi is not None and (v > hi or (v == hi and not hi_ok)))
        if name == "lmax" and not bad:
            bad = v % 2 != 0
        if bad:
            raise TractfuncError(f"{_flag(name)} {v:g}: expected {expected}")


def add_force(p: argparse.ArgumentParser) -> None:
    """The --force flag of a command that writes files."""
    p.add_argument("--force", action="store_true",
                   help="overwrite existing output files (never an input file); without it an existing output is "
                        "an error, as with tckgen -force")
