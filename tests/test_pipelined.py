"""The pipelined eager tracker schedules Newton searches per streamline; its output must be identical."""
import pytest
import torch

from tractfunc import seeds as S
from tractfunc.params import resolve
from tractfunc.tracking import random_directions, track


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pipelined_equals_plain(phantom_field, dtype):
    f = phantom_field
    g = torch.Generator().manual_seed(21)
    pts = S.random_in_mask(torch.as_tensor(f["ph"].seed_mask), f["ph"].affine, 60, g).to(dtype)
    dirs = random_directions(60, g, dtype)
    fld = f["field32"] if dtype == torch.float32 else f["field64"]
    for prm in (resolve(f["img"].voxel_sizes, max_length=30.0),
                resolve(f["img"].voxel_sizes, max_length=15.0, cutoff=1.2)):   # mask, budget and cutoff stops
        a = track(fld, prm, pts, dirs, mask=f["mask"], pipelined=True)
        b = track(fld, prm, pts, dirs, mask=f["mask"], pipelined=False)
        assert torch.equal(a.reasons, b.reasons) and torch.equal(a.seed_ids, b.seed_ids)
        assert torch.equal(a.seed_index, b.seed_index)
        assert len(a.streamlines) == len(b.streamlines) > 10
        assert all(torch.equal(x, y) for x, y in zip(a.streamlines, b.streamlines))
    # the stop reasons exercised include cutoff and length, not only the mask
    assert len(set(a.reasons.flatten().tolist())) >= 3, "expected several stop reasons"
