"""Issue 15's speed traps stay fixed, and their fixes leave the gradients where they were.

* A Fortran-ordered FOD (``torch.from_numpy`` of a NIfTI array, passed as ``field._replace(sh=leaf)``) is made
  contiguous once per call, not copied at every sample.
* Every differentiable route of :func:`tractfunc.track` (fixed, eager, follow) accumulates the FOD gradient in
  one compact buffer per call (:mod:`tractfunc.core.fodgrad`) instead of zero-filling a volume per sample.

Volume-sized work is counted with a dispatch mode (a property of the code, not a timing)."""
import contextlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import phantom_seeds

import tractfunc as tf
from tractfunc.core import params as P


class _VolumeOps(TorchDispatchMode):
    """Counts operations whose output is at least as large as the FOD volume (allocations, fills, copies),
    except ``index_add_`` into the one compact gradient buffer."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        if (isinstance(out, torch.Tensor) and out.numel() >= self.numel and "index_add" not in name
                and not func.is_view):
            self.count += 1
        return out


def _run(fld, prm, pts, dirs, mask, engine, leaf, seeds, count=False):
    u = torch.tensor([0.48, -0.6, 0.64], dtype=leaf.dtype)
    kw = dict(n_steps=20) if engine == "fixed" else {}
    fwd, bwd = _VolumeOps(leaf.numel()), _VolumeOps(leaf.numel())
    with fwd if count else contextlib.nullcontext():
        tr = tf.track(fld._replace(sh=leaf), prm, seeds, dirs, mask=mask, engine=engine, **kw)
    loss = (tr.vertices @ u).sum()
    with bwd if count else contextlib.nullcontext():
        loss.backward()
    return tr, fwd.count, bwd.count


@pytest.mark.parametrize("engine", ["fixed", "eager", "follow"])
def test_one_volume_sized_buffer_per_call_and_same_gradients(phantom_field, engine, monkeypatch):
    """Fortran-ordered leaf: at most one contiguous copy in the forward, at most one gradient buffer (and its
    hand-over, plus AccumulateGrad's copy into the leaf's Fortran layout) in the backward; the gradients wrt the FOD and the seeds equal those of a C-ordered leaf bit for
    bit, and those of plain autograd through the pure sampler (the reference) to 1e-10 relative (float64)."""
    f = phantom_field
    prm = P.resolve(f["img"].voxel_sizes, max_length=4.0, min_length=1.0, exact=engine != "follow")
    pts, dirs, fld = phantom_seeds(f, 6, 7)
    fld = tf.make_field(f["field64"].sh, f["img"].affine, precomputed=engine == "follow")
    base = np.asfortranarray(f["img"].data.astype(np.float64))
    grads = {}
    for layout in ("F", "C"):
        arr = base if layout == "F" else np.ascontiguousarray(base)
        leaf = torch.from_numpy(arr.copy(order="K")).requires_grad_(True)
        assert leaf.is_contiguous() == (layout == "C")
        s = pts.to(torch.float64).clone().requires_grad_(True)
        tr, nf, nb = _run(fld, prm, pts, dirs.double(), f["mask"], engine, leaf, s, count=True)
        assert tr.vertices.shape[0] > 40
        # forward: the contiguous copy of an F-ordered leaf, plus follow's float32 copy for the native decider
        assert nf <= (layout == "F") + (engine == "follow"), (layout, nf)
        assert nb <= (3 if layout == "F" else 2), (layout, nb)   # buffer (+ AccumulateGrad's copy into F order)
        grads[layout] = (leaf.grad, s.grad)
    assert torch.equal(grads["F"][0], grads["C"][0]) and torch.equal(grads["F"][1], grads["C"][1])
    # the reference: plain autograd through interpolate.sample_fod (no compact sink), same decisions
    from tractfunc.core import fodgrad
    leaf = torch.from_numpy(np.ascontiguousarray(base)).requires_grad_(True)
    s = pts.to(torch.float64).clone().requires_grad_(True)
    monkeypatch.setattr(fodgrad, "attach", lambda sh: (None, None))
    _run(fld, prm, pts, dirs.double(), f["mask"], engine, leaf, s)
    for got, ref in zip(grads["C"], (leaf.grad, s.grad)):
        assert float(got.abs().max()) > 0
        assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sh_jet_contractions_equal_einsum_bit_for_bit(dtype):
    """The exact SH jet's contractions are batched matmuls (trap 4: einsum's planning cost); they give the
    einsum results bit for bit, so the PyTorch engines' float32/float64 output does not move."""
    from tractfunc.core import sh
    g = torch.Generator().manual_seed(3)
    c = torch.randn(257, 45, generator=g, dtype=dtype)
    u = torch.nn.functional.normalize(torch.randn(257, 3, generator=g, dtype=dtype), dim=-1)
    B, dB, d2B = sh._jet(u, 8, order=2)
    j = sh.sh_jet(c, u)
    gref = torch.einsum("...k,...ki->...i", c, dB)
    Href = torch.einsum("...k,...kij->...ij", c, d2B)
    P = torch.eye(3, dtype=dtype) - u.unsqueeze(-1) * u.unsqueeze(-2)
    assert torch.equal(j.grad, (P @ gref.unsqueeze(-1)).squeeze(-1))
    assert torch.equal(j.hess, P @ Href @ P - (u * gref).sum(-1)[..., None, None] * P)
    lj = sh.exact_line_jet(c, u)
    assert torch.equal(lj.curv, torch.einsum("...i,...ij,...j->...", lj.gdir, j.hess, lj.gdir))
