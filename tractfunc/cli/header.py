"""The .tck header of ``tractfunc track``: tckgen's keys and number formats for SD_Stream (what ``tckinfo`` shows
for a tckgen file), with tractfunc's version in place of MRtrix3's.

tckgen (3.0.3) writes, for ``-algorithm SD_Stream``: command_history, init_threshold, max_angle, max_dist,
max_num_seeds, max_num_tracks, max_seed_attempts, method (``SDStream``), min_dist, mrtrix_version, rk4,
sh_precomputed, source, step_size, stop_on_all_include, threshold, timestamp, unidirectional, then
``roi: seed NAME`` / ``roi: mask PATH`` lines, and the counts (``count``: streamlines written; ``total_count``:
streamlines generated, i.e. written plus rejected for their length; seeds rejected at the seed point are in
neither).  Numbers are float32 values printed with 9 significant digits (:func:`tractfunc.io.images.tck_value`).
"""
from __future__ import annotations

import os
import shlex
import time
from typing import Optional

import numpy as np


def command_history(argv, prog: str = "tractfunc") -> str:
    """``prog ARG ...  (version=tractfunc X)``, as tckgen records ``tckgen ARG ...  (version=3.0.3)``."""
    from .. import __version__
    return f"{prog} {' '.join(shlex.quote(str(x)) for x in argv)}  (version=tractfunc {__version__})"


def timestamp(t: Optional[float] = None) -> str:
    """Seconds since the epoch with 20 significant digits, as tckgen writes ``timestamp``."""
    return f"{time.time() if t is None else t:.20g}"


def track_header(a, prm, max_num_seeds: int, max_num_tracks: int) -> dict:
    """The header of a ``tractfunc track`` run (``a``: its parsed options, ``prm``: the resolved
    :class:`tractfunc.core.params.TrackParams`; ``max_num_seeds`` / ``max_num_tracks``: the seed and
    streamline limits, 0 = none).  ``count`` / ``total_count`` are added by the writer."""
    f32 = np.float32
    seed = (a.seed_image or a.seed_points or getattr(a, "seed_sphere", None) or getattr(a, "seed_rejection", None)
            or getattr(a, "seed_gmwmi", None)
            or (getattr(a, "seed_random_per_voxel", None) or getattr(a, "seed_grid_per_voxel", None) or [""])[0])
    roi = [f"seed {os.path.basename(seed)}"]
    if a.mask:
        roi.append(f"mask {a.mask}")
    act = {"act": a.act, "backtrack": 0} if getattr(a, "act", None) else {}
    if act and getattr(a, "crop_at_gmwmi", False):
        act["crop_at_gmwmi"] = 1
    for key, name in (("include", "include"), ("include_ordered", "include_ordered"), ("exclude", "exclude")):
        roi += [f"{name} {spec}" for spec in getattr(a, key, None) or []]
    return {**act,
        "command_history": command_history(getattr(a, "argv", [])),
        "init_threshold": f32(prm.cutoff if getattr(a, "seed_cutoff", None) is None else a.seed_cutoff),
        "max_angle": f32(prm.angle), "max_dist": f32(prm.max_length),
        "max_num_seeds": int(max_num_seeds), "max_num_tracks": int(max_num_tracks),
        "max_seed_attempts": int(getattr(a, "max_attempts_per_seed", None) or 1000),
        "method": "SDStream", "min_dist": f32(prm.min_length), "rk4": int(prm.rk4),
        "sh_precomputed": int(prm.precomputed), "source": a.fod, "step_size": f32(prm.step),
        "stop_on_all_include": int(bool(getattr(a, "stop", False) and (getattr(a, "include", None)
                                                                          or getattr(a, "include_ordered", None)))), "threshold": f32(prm.cutoff), "timestamp": timestamp(),
        "tractfunc_version": _version(), "unidirectional": int(bool(getattr(a, "seed_unidirectional", False))), "roi": roi,
    }


def _version() -> str:
    from .. import __version__
    return str(__version__)
