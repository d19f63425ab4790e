"""tractfunc.sdstream.follow: the PyTorch tracker in float64 (or with gradients) taking its discrete decisions from the
native kernel -- tckgen's streamlines, every value recomputed in the field's dtype."""
import numpy as np
import pytest
import torch

from tractfunc.sdstream import native
from tractfunc.core import params as P
from tractfunc.sdstream.follow import follow
from tractfunc.errors import TractfuncError
from tractfunc.sdstream.track import track

from conftest import phantom_seeds

pytestmark = pytest.mark.skipif(not native.available()[0], reason="native kernel unavailable (no C compiler)")


def _native_and_float64(f, n=200, seed=3, rk4=False):
    prm = P.resolve(f["img"].voxel_sizes, rk4=rk4)
    pts, dirs, fld = phantom_seeds(f, n, seed)
    ref = track(fld, prm, pts, dirs, mask=f["mask"], engine="native")
    got = track(f["field64"], prm, pts.double(), dirs.double(), mask=f["mask"], engine="follow")
    return prm, pts, dirs, ref, got


@pytest.mark.parametrize("rk4", [False, True])
def test_float64_takes_the_kernels_decisions(phantom_field, rk4):
    """``engine="follow"``: same seeds accepted, same vertex counts and seed indices as the native kernel
    (= tckgen), every vertex within float32 rounding of the kernel's (the values are float64)."""
    prm, pts, dirs, ref, got = _native_and_float64(phantom_field, rk4=rk4)
    assert got.vertices.dtype == torch.float64
    assert torch.equal(got.accepted, ref.accepted) and torch.equal(got.lengths, ref.lengths)
    assert torch.equal(got.seed_index, ref.seed_index) and torch.equal(got.reasons, ref.reasons)
    err = (got.vertices - ref.vertices.double()).norm(dim=-1)
    assert float(err.max()) < 1e-2, float(err.max())
    # not a copy: float64 values differ from the float32 kernel's
    assert float(err.max()) > 0


def test_follow_reproduces_own_float64_tracks(phantom_field):
    """Following the float64 tracker's own streamlines reproduces them: the peak searched from the reference
    direction is the one the tracker found from the previous direction (exact peaks: ``peak_polish``;
    tckgen's 1e-4 rad Newton tolerance alone leaves ~1e-3 mm over a streamline)."""
    f = phantom_field
    prm = P.resolve(f["img"].voxel_sizes, peak_polish=3)
    pts, dirs, fld = phantom_seeds(f, 40, 5, torch.float64)
    own = track(fld, prm, pts, dirs, mask=f["mask"], engine="eager")
    fol = follow(fld, prm, pts[own.seed_ids], own.vertices, own.lengths, own.seed_index)
    assert bool(fol.faithful.all())
    assert float((fol.vertices - own.vertices).norm(dim=-1).max()) < 1e-8


def test_engine_rule_follows_the_kernel_for_float64(phantom_field):
    """``engine="auto"`` follows the kernel's decisions for float64 on the CPU with tckgen's lookup-table peaks;
    an explicit eager run decides itself; exact peaks (``peak_polish``) follow the kernel's decisions with exact
    values, exact SH at tckgen's Newton tolerance does not (the values would depend on the start of each search)."""
    from tractfunc.sdstream import engine as E
    f = phantom_field
    prm = P.resolve(f["img"].voxel_sizes)
    pts, dirs, fld = phantom_seeds(f, 4, 1, torch.float64)
    job = E.describe(fld, prm, pts)
    assert E.choose(job) == "follow" and E.choose(job, "eager") == "eager"
    assert track(fld, prm, pts, dirs, mask=f["mask"]).engine == "follow"
    assert track(fld, prm, pts, dirs, mask=f["mask"], engine="eager").engine == "eager"
    with pytest.raises(TractfuncError, match="engine must be one of"):
        E.choose(job, "tckgen")
    exact = P.resolve(f["img"].voxel_sizes, exact=True)   # exact peaks: the kernel decides, the values are exact
    assert E.choose(E.describe(fld._replace(table=None), exact, pts)) == "follow"
    exact_sh = P.resolve(f["img"].voxel_sizes, precomputed=False)   # exact SH with tckgen's tolerance: eager
    assert E.choose(E.describe(fld._replace(table=None), exact_sh, pts)) == "eager"
    with pytest.raises(TractfuncError, match="lookup-table peaks"):
        track(fld, exact_sh, pts, dirs, engine="follow")


def test_gradient_along_fixed_decisions_matches_finite_differences(phantom_field):
    """d(streamline)/d(seed) with the decisions held: autograd vs central differences (float64)."""
    f = phantom_field
    prm = P.resolve(f["img"].voxel_sizes, peak_polish=3)
    pts, dirs, fld = phantom_seeds(f, 12, 9, torch.float64)
    ref = track(fld, prm, pts, dirs, mask=f["mask"], engine="follow")
    pick = int(torch.argmax(ref.lengths))                     # the longest streamline
    n = int(ref.lengths[pick])
    off = int(ref.lengths[:pick].sum())
    one = (ref.vertices[off:off + n], ref.lengths[pick:pick + 1], ref.seed_index[pick:pick + 1])
    seed = pts[ref.seed_ids[pick:pick + 1]].clone().requires_grad_(True)
    w = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss(s):
        return (follow(fld, prm, s, *one).vertices * w).sum()

    g, = torch.autograd.grad(loss(seed), seed)
    h = 1e-6
    fd = torch.stack([(loss(seed.detach() + h * e) - loss(seed.detach() - h * e)) / (2 * h)
                      for e in torch.eye(3, dtype=torch.float64)])
    assert torch.allclose(g[0], fd, rtol=1e-5, atol=1e-7), (g, fd)


@pytest.mark.parametrize("rk4,n", [(False, 300), (True, 100)])
def test_float64_reproduces_tckgen_given_the_start(tmp_path, rk4, n):
    """tckgen with a known start direction (-seed_direction) on the Philips FOD, re-tracked in float64
    (arithmetic and state) by the parity harness's default route (the kernel's decisions): every streamline within 0.05 mm of tckgen's (float32 rounding
    drifts ~1e-2 mm over the longest ones), none lost."""
    from conftest import require_philips, require_tckgen
    from tractfunc.tools import parity
    from conftest import START
    require_tckgen()
    d = require_philips()
    tck, csv = str(tmp_path / "ref.tck"), str(tmp_path / "seeds.csv")
    parity.run_tckgen(d["fod"], tck, csv, d["seed"], d["mask"], n, rk4=rk4, nthreads=0, rng_seed=5,
                      seed_direction=START)
    r = parity.compare(parity.load_reference(tck, csv), d["fod"], d["mask"], rk4, torch.float64, start=START,
                       state_dtype=None)
    print(f"float64 rk4={rk4}: max {r.distances.max():.2e} mm, median {np.median(r.distances):.2e} mm")
    assert r.engine == "follow" and r.lost == 0 and r.too_short == 0
    assert float(r.distances.max()) < 0.05
