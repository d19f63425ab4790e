"""The pipelined eager tracker schedules Newton searches per streamline; its output must be identical."""
import pytest
import torch

from conftest import phantom_seeds

from tractfunc.core import seeds as S
from tractfunc.core.params import resolve
from tractfunc.core.seeds import random_directions
from tractfunc.core.tracks import Tracks
from tractfunc.sdstream.eager import track_chunk
from tractfunc.sdstream.track import track


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pipelined_equals_plain(phantom_field, dtype):
    f = phantom_field
    pts, dirs, fld = phantom_seeds(f, 60, 21, dtype)
    for prm in (resolve(f["img"].voxel_sizes, max_length=30.0),
                resolve(f["img"].voxel_sizes, max_length=15.0, cutoff=1.2)):   # mask, budget and cutoff stops
        a = Tracks(*track_chunk(fld, prm, f["mask"], pts, dirs, pipelined=True))
        b = Tracks(*track_chunk(fld, prm, f["mask"], pts, dirs, pipelined=False))
        assert torch.equal(a.reasons, b.reasons) and torch.equal(a.seed_ids, b.seed_ids)
        assert torch.equal(a.seed_index, b.seed_index)
        assert len(a.streamlines()) == len(b.streamlines()) > 10
        assert all(torch.equal(x, y) for x, y in zip(a.streamlines(), b.streamlines()))
    # the stop reasons exercised include cutoff and length, not only the mask
    assert len(set(a.reasons.flatten().tolist())) >= 3, "expected several stop reasons"


def test_pack_matches_a_loop_over_streamlines():
    """Vectorised assembly of accepted streamlines (reversed forward half, seed, backward half) equals
    the per-streamline construction, for random vertex rows in step order."""
    from tractfunc.sdstream.eager import _pack
    g = torch.Generator().manual_seed(4)
    S_ = 9
    seeds = torch.randn(S_, 3, generator=g)
    halves = []
    for _ in range(2):
        per = [torch.randn(int(torch.randint(0, 5, (1,), generator=g)), 3, generator=g) for _ in range(S_)]
        # rows interleaved across streamlines as the drivers emit them: step by step
        rows = [(i, p[k]) for k in range(5) for i, p in enumerate(per) if k < len(p)]
        idx = torch.tensor([r[0] for r in rows], dtype=torch.long)
        pos = torch.stack([r[1] for r in rows]) if rows else torch.zeros(0, 3)
        halves.append((per, (idx, pos)))
    (fper, frows), (bper, brows) = halves
    verts, lengths, sidx, acc = _pack(seeds, frows, brows, min_points=4)
    want = [torch.cat([fper[i].flip(0), seeds[i:i + 1], bper[i]]) for i in range(S_)]
    assert acc.tolist() == [len(w) >= 4 for w in want]
    got = torch.split(verts, lengths.tolist())
    kept = [w for w, a in zip(want, acc.tolist()) if a]
    assert len(got) == len(kept) and all(torch.equal(x, y) for x, y in zip(got, kept))
    assert sidx.tolist() == [len(fper[i]) for i in range(S_) if acc[i]]


def test_compiled_move_tracks_like_eager(phantom_field):
    """``compiled=True`` (torch.compile of the Newton move): same seeds accepted and streamlines within
    float32 rounding of the eager ones (inductor reassociates sums, so not bit for bit)."""
    f = phantom_field
    g = torch.Generator().manual_seed(22)
    pts = S.random_in_mask(torch.as_tensor(f["ph"].seed_mask), f["ph"].affine, 40, g).float()
    dirs = random_directions(40, g)
    prm = resolve(f["img"].voxel_sizes, max_length=30.0)
    a = track(f["field32"], prm, pts, dirs, mask=f["mask"])
    b = track(f["field32"], prm, pts, dirs, mask=f["mask"], compiled=True)
    assert a.engine == "native" and b.engine == "eager"
    assert torch.equal(a.seed_ids, b.seed_ids) and len(a.streamlines()) > 10
    assert all(x.shape == y.shape and float((x - y).abs().max()) < 1e-3 for x, y in zip(a.streamlines(), b.streamlines()))
