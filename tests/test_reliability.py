"""Reliability: corrupt files raise the library's own error, results do not depend on how the work is split,
and an interrupted run leaves no file that could pass for a complete one."""
import gzip
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import phantom_seeds
from tractfunc import io
from tractfunc.io import TractfuncError
from tractfunc.params import resolve
from tractfunc.tracking import track


def _small_fod_bytes(tmp_path_factory):
    import nibabel as nib
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    img = nib.Nifti1Image(rng.standard_normal((3, 4, 2, 15)).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    path = d / "fod.nii"
    nib.save(img, str(path))
    return path.read_bytes()


@pytest.fixture(scope="module")
def fod_bytes(tmp_path_factory):
    return _small_fod_bytes(tmp_path_factory)


def _load_or_library_error(path, loader):
    """The reader either returns a well-formed image or raises TractfuncError; nothing else."""
    try:
        img = loader(str(path))
    except TractfuncError as e:
        assert str(e).startswith(str(path)), "the message names the file"
        return None
    assert np.all(np.isfinite(img.affine)) and np.isfinite(img.data).all()
    return img


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_nifti_raises_library_error(tmp_path, fod_bytes, data):
    b = bytearray(fod_bytes)
    kind = data.draw(st.sampled_from(["flip", "truncate", "gzip-truncate"]))
    if kind == "flip":   # overwrite a few bytes, mostly in the 348-byte header
        for _ in range(data.draw(st.integers(1, 6))):
            i = data.draw(st.integers(0, min(len(b) - 1, 400)))
            b[i] = data.draw(st.integers(0, 255))
        raw = bytes(b)
        name = "c.nii"
    elif kind == "truncate":
        raw = bytes(b[:data.draw(st.integers(0, len(b) - 1))])
        name = "c.nii"
    else:
        z = gzip.compress(bytes(b))
        raw = z[:data.draw(st.integers(0, len(z) - 1))]
        name = "c.nii.gz"
    path = tmp_path / name
    path.write_bytes(raw)
    _load_or_library_error(path, io.load_fod)
    _load_or_library_error(path, io.load_mask)


def test_unreadable_text_inputs_raise_library_error(tmp_path):
    p = tmp_path / "seeds.txt"
    p.write_bytes(b"\x00\xff\xfe garbage\n1 2\n")
    with pytest.raises(TractfuncError):
        io.read_seed_points(str(p))
    p.write_text("1 2 nan\n")
    with pytest.raises(TractfuncError, match="non-finite"):
        io.read_seed_points(str(p))
    p.write_text("x y z\n1 2 3\n4 5 six\n7 8 9\n")   # a corrupted row is not silently dropped
    with pytest.raises(TractfuncError, match="row 3"):
        io.read_seed_points(str(p))
    p.write_text("x y z\n1 2 3\n7 8 9\n")
    assert io.read_seed_points(str(p)).shape == (2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_output_for_any_chunk_size_and_thread_count(phantom_field, dtype):
    """Bit-identical streamlines whatever the seed chunk size or the number of intra-op threads."""
    f = phantom_field
    pts, dirs, fld = phantom_seeds(f, 50, 31, dtype)
    prm = resolve(f["img"].voxel_sizes, max_length=25.0)
    runs = []
    threads = torch.get_num_threads()
    try:
        for chunk, nt in ((50, 1), (7, 1), (16, 2), (50, 2)):
            torch.set_num_threads(nt)
            r = track(fld, prm, pts, dirs, mask=f["mask"], chunk_size=chunk)
            runs.append(r)
    finally:
        torch.set_num_threads(threads)
    a = runs[0]
    assert len(a.streamlines) > 10
    for b in runs[1:]:
        assert torch.equal(a.seed_ids, b.seed_ids) and torch.equal(a.reasons, b.reasons)
        assert all(torch.equal(x, y) for x, y in zip(a.streamlines, b.streamlines))


def test_sigint_leaves_no_output(tmp_path, phantom_files):
    """Ctrl-C during a long run: non-zero exit, and neither the output nor a partial file remains."""
    ph, paths = phantom_files
    out = tmp_path / "big.tck"
    p = subprocess.Popen([sys.executable, "-m", "tractfunc.cli", "track", paths["fod"], str(out), "--seed-image",
                          paths["mask"], "--seeds", "2000000", "--chunk", "2000", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "big.tck.partial"
    t0 = time.time()
    while not partial.exists() and time.time() - t0 < 60 and p.poll() is None:
        time.sleep(0.2)
    assert partial.exists(), "the run should be streaming into its .partial file"
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0
    assert not out.exists() and not partial.exists(), err[-2000:]
