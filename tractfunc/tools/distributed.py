"""Seeds sharded across processes started by ``torchrun`` (``torch.distributed``).

Every rank draws the same seed batches from the same generator, tracks its contiguous slice of each batch,
and writes the streamlines it keeps to its own part file.  Only the small per-streamline records (lengths,
seed ids, seed vertex indices) travel between ranks, so every rank applies ``--select`` exactly as one
process would.  At the end rank 0 concatenates byte ranges of the part files, batch by batch and rank by
rank, into the one output: the result is byte-identical to a single-process run.

    torchrun --nproc_per_node 2 -m tractfunc.cli track fod.nii.gz out.tck --seed-image wm.nii.gz --select 5000

Backend: gloo on CPU; nccl with ``--device cuda``, where rank r uses ``cuda:LOCAL_RANK``.
"""
from __future__ import annotations

import os
from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np


class Batch(NamedTuple):
    """Result of tracking one seed batch, as seen by one process.

    lengths, seed_ids, seed_index: (A,) for every accepted streamline of the whole batch, in seed order;
    vertices: (V, 3) scanner mm of the streamlines ``first .. first + n_local - 1`` of that list only
    (all of them in a single process); seed_ok: (S,) bool per seed of the batch, False where the seed
    was rejected (outside the mask or image, or no peak above the cutoff)."""
    vertices: np.ndarray
    lengths: np.ndarray
    seed_ids: np.ndarray
    seed_index: np.ndarray
    first: int = 0
    n_local: int = -1
    seed_ok: Optional[np.ndarray] = None

    def local_prefix(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Of the batch's first k streamlines, those held here: (vertices, lengths)."""
        n_local = len(self.lengths) if self.n_local < 0 else self.n_local
        lens = self.lengths[self.first:self.first + n_local]
        n = int(np.clip(k - self.first, 0, n_local))
        return self.vertices[:int(lens[:n].sum())], lens[:n]


def launched() -> bool:
    """True inside a multi-process ``torchrun`` launch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Shard:
    """This process's place in the launch; joins the process group on creation."""

    def __init__(self, device):
        import torch
        import torch.distributed as dist
        self.dist = dist
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.cuda else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def device(self, device):
        import torch
        return torch.device("cuda", torch.cuda.current_device()) if self.cuda else device

    def track(self, run: Callable, pts: np.ndarray, dirs: np.ndarray) -> Batch:
        """Track this rank's slice of the batch with ``run(pts, dirs) -> (vertices, lengths, ids, sidx, ok)``
        and share the per-streamline records."""
        b = np.linspace(0, len(pts), self.world + 1).astype(int)
        lo, hi = b[self.rank], b[self.rank + 1]
        verts, lengths, ids, sidx, ok = run(pts[lo:hi], dirs[lo:hi])
        parts: List = [None] * self.world
        self.dist.all_gather_object(parts, (np.asarray(lengths), np.asarray(ids) + lo, np.asarray(sidx), np.asarray(ok)))
        first = sum(len(p[0]) for p in parts[:self.rank])
        cat = (lambda i: np.concatenate([p[i] for p in parts]))
        return Batch(verts, cat(0), cat(1), cat(2), first, len(lengths), cat(3))

    def all_gather(self, obj) -> list:
        out: List = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
