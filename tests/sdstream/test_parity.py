"""Streamline-for-streamline parity with MRtrix3 tckgen -algorithm SD_Stream, from tckgen's random starts.

Acceptance bar (issue #3): >= 99.5% of streamlines within 0.1 mm and >= 99.9% within 1 mm (symmetric
Hausdorff), no seed lost.  tckgen does not record the random direction each seed's peak search starts
from, and SD_Stream flips termination decisions under perturbations far below what the first step
reveals (~1e-5 rad), so the start is reconstructed with tckgen's own arithmetic
(:func:`tractfunc.tools.parity.reconstruct_native`); tests/sdstream/test_native.py covers the case where tckgen is given
the start (-seed_direction) and every streamline must be bit-identical.

Measured on 10 000 streamlines (`pytest -m slow tests/sdstream/test_parity.py -s`, MRTRIX_RNG_SEED 7 and 11):
native float32 Euler 99.97 / 99.93 %, RK4 99.96 / 99.98 % within 1 mm (67 % / 77 % of streamlines bit-identical:
the rest started from a reconstructed direction that is not tckgen's to the last bit).  The PyTorch tracker
(differentiable path, any dtype) sums in another order than tckgen, so it flips about 0.1 % of decisions
(seed 11): float32 99.86 %, float64 arithmetic with tckgen's float32 state 99.90 % (RK4 99.93 %), float64
arithmetic and state 99.86 %.
On 2000 streamlines the 1 mm bar is asserted at 99.75 % (<= 5 flips) for the PyTorch tracker taking its own
decisions.  Taking the kernel's decisions (:mod:`tractfunc.sdstream.follow`; the parity harness's default for
float64), float64 -- arithmetic and state -- meets the bar itself: 10 000 streamlines, Euler 99.96 / 99.93 %,
RK4 99.96 / 99.97 % within 1 mm (seeds 7 / 11).
"""
import pytest
import torch

from tractfunc.tools import parity

from conftest import require_philips, require_tckgen


def _run(tmp_path, fod, seed_img, mask, select, rk4, dtype, rng_seed=1, engine="auto", state_dtype=torch.float32):
    tck, csv = str(tmp_path / "ref.tck"), str(tmp_path / "seeds.csv")
    parity.run_tckgen(fod, tck, csv, seed_img, mask, select, rk4=rk4, nthreads=0, rng_seed=rng_seed)
    ref = parity.load_reference(tck, csv)
    assert len(ref.streamlines) == select
    return parity.compare(ref, fod, mask, rk4, dtype, engine=engine, state_dtype=state_dtype)


def _show(name, r):
    print(f"{name} [{r.engine}]: {r.identical:.4f} bit-identical, {r.within_01:.4f} within 0.1 mm, "
          f"{r.within_1:.4f} within 1 mm, lost {r.lost}, too short {r.too_short}")


@pytest.mark.parametrize("rk4", [False, True])
def test_parity_oblique_phantom(tmp_path, phantom_files, rk4):
    require_tckgen()
    ph, paths = phantom_files
    r = _run(tmp_path, paths["fod"], paths["mask"], paths["mask"], 300, rk4, torch.float32)
    _show(f"phantom rk4={rk4}", r)
    assert r.lost == 0
    assert r.within_01 >= 0.995 and r.within_1 >= 0.995


@pytest.mark.parametrize("rk4", [False, True])
def test_parity_real_data_2000_native(tmp_path, rk4):
    """The default tracker (native kernel, float32): the acceptance bar itself."""
    require_tckgen()
    d = require_philips()
    r = _run(tmp_path, d["fod"], d["seed"], d["mask"], 2000, rk4, torch.float32)
    _show(f"philips rk4={rk4} float32", r)
    assert r.engine == "native" and r.lost == 0
    assert r.within_01 >= 0.995 and r.within_1 >= 0.999
    assert r.identical >= 0.5   # a reconstructed start is tckgen's to the last bit for most seeds


@pytest.mark.parametrize("rk4", [False, True])
def test_parity_real_data_2000_float64(tmp_path, rk4):
    """float64 (arithmetic and state), the default route: the PyTorch tracker with the native kernel's
    decisions (:mod:`tractfunc.sdstream.follow`): the acceptance bar itself."""
    require_tckgen()
    d = require_philips()
    r = _run(tmp_path, d["fod"], d["seed"], d["mask"], 2000, rk4, torch.float64, state_dtype=None)
    _show(f"philips rk4={rk4} float64", r)
    assert r.engine == "follow" and r.lost == 0 and r.too_short == 0
    assert r.within_01 >= 0.995 and r.within_1 >= 0.999


@pytest.mark.parametrize("dtype,state", [pytest.param(torch.float32, torch.float32, marks=pytest.mark.slow),
                                         (torch.float64, torch.float32)])
def test_parity_real_data_2000_pytorch(tmp_path, dtype, state):
    """The differentiable PyTorch tracker, float32 and float64 arithmetic (tckgen's float32 state)."""
    require_tckgen()
    d = require_philips()
    r = _run(tmp_path, d["fod"], d["seed"], d["mask"], 2000, False, dtype, engine="eager", state_dtype=state)
    _show(f"philips {dtype} (state {state})", r)
    assert r.engine == "eager" and r.lost == 0
    assert r.within_01 >= 0.995 and r.within_1 >= 0.9975


@pytest.mark.slow
@pytest.mark.parametrize("rk4", [False, True])
@pytest.mark.parametrize("rng_seed", [7, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_real_data_10000_default(tmp_path, rk4, rng_seed, dtype):
    """The default routes: float32 on the native kernel; float64 on the PyTorch tracker with the kernel's
    decisions, every value in float64 (state included)."""
    require_tckgen()
    d = require_philips()
    r = _run(tmp_path, d["fod"], d["seed"], d["mask"], 10000, rk4, dtype, rng_seed=rng_seed, state_dtype=None)
    _show(f"philips 10k rk4={rk4} seed {rng_seed} {dtype}", r)
    assert r.engine == ("native" if dtype == torch.float32 else "follow") and r.lost == 0
    assert r.within_01 >= 0.995 and r.within_1 >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("rk4,dtype,state", [(False, torch.float32, torch.float32), (False, torch.float64, torch.float32),
                                             (False, torch.float64, None), (True, torch.float64, torch.float32)])
def test_parity_real_data_10000_pytorch(tmp_path, rk4, dtype, state):
    """The PyTorch tracker taking its own decisions (``engine="eager"``) on 10 000 streamlines: the
    measured level (99.86-99.93 % within 1 mm), below the 99.9 % bar in some configurations: it sums in
    another order than tckgen, and about 0.1 % of SD_Stream's decisions sit at rounding level."""
    require_tckgen()
    d = require_philips()
    r = _run(tmp_path, d["fod"], d["seed"], d["mask"], 10000, rk4, dtype, rng_seed=11, engine="eager",
             state_dtype=state)
    _show(f"philips 10k rk4={rk4} {dtype} state {state}", r)
    assert r.lost == 0
    assert r.within_01 >= 0.995 and r.within_1 >= 0.998
