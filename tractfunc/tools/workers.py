"""Process-parallel tracking: the seeds of a batch are split across worker processes.

Each worker (started with ``spawn``) loads the inputs once and runs :func:`tractfunc.track` with
its own single-threaded torch, on a contiguous slice of the batch; the parent concatenates the slices in
order.  Streamlines are independent and start directions are drawn in the parent, so the output is
identical to a single-process run; on CPU, processes scale better than torch's intra-op threads for the
many small per-tick operations of the tracker.
"""
from __future__ import annotations

import multiprocessing as mp
from typing import Tuple

import numpy as np
import torch

_STATE: dict = {}


def _init(args, dtype_name: str, threads: int) -> None:
    from .inputs import torch_inputs
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    _, prm, fld, msk = torch_inputs(args, dtype, torch.device("cpu"))
    _STATE.update(prm=prm, fld=fld, msk=msk, dtype=dtype, compiled=getattr(args, "compile", False),
                  engine=getattr(args, "engine", "auto"))


def _work(job: Tuple[np.ndarray, np.ndarray]):
    from ..sdstream.track import track
    pts, dirs = job
    s = _STATE
    res = track(s["fld"], s["prm"], torch.as_tensor(pts, dtype=s["dtype"]), torch.as_tensor(dirs, dtype=s["dtype"]),
                mask=s["msk"], compiled=s["compiled"], engine=s["engine"])
    return (*(x.numpy() for x in (res.vertices, res.lengths, res.seed_ids, res.seed_index)), res.seeds_ok().numpy())


class Pool:
    """``n`` worker processes tracking with the inputs named by the CLI arguments ``args``."""

    def __init__(self, args, dtype_name: str, n: int, threads_each: int = 1):
        self.n = n
        self.pool = mp.get_context("spawn").Pool(n, initializer=_init, initargs=(args, dtype_name, threads_each))

    def track(self, pts: np.ndarray, dirs: np.ndarray) -> Tuple[np.ndarray, ...]:
        """Seeds (S, 3) mm and start directions (S, 3) -> packed streamlines (vertices (V, 3), lengths
        (A,)), seed ids (A,), seed vertex indices (A,), seed accepted (S,), in seed order, as one
        :func:`tractfunc.track` call would give them."""
        bounds = np.linspace(0, len(pts), self.n + 1).astype(int)
        spans = [(b0, b1) for b0, b1 in zip(bounds[:-1], bounds[1:]) if b1 > b0]
        results = self.pool.map(_work, [(pts[b0:b1], dirs[b0:b1]) for b0, b1 in spans])
        if not results:
            return np.zeros((0, 3)), *(np.zeros(0, dtype=np.int64) for _ in range(3)), np.zeros(0, dtype=bool)
        verts, lengths, ids, sidx, ok = zip(*results)
        ids = [i + b0 for i, (b0, _) in zip(ids, spans)]
        return tuple(np.concatenate(x) for x in (verts, lengths, ids, sidx, ok))

    def close(self) -> None:
        self.pool.close()
        self.pool.join()
