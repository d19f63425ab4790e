"""Array inputs at the public boundary: any DLPack array (NumPy, JAX, CuPy, ...) as a torch tensor.

The public functions call :func:`as_tensor` on the arrays a user hands them, so a NumPy or JAX array can
be passed wherever a tensor is documented.  The conversion shares memory with the input (no copy) when
it can: torch tensors pass unchanged, NumPy arrays go through ``torch.from_numpy`` (read-only ones
through DLPack), other objects with ``__dlpack__`` through ``torch.from_dlpack`` on their own device (a
JAX array on the GPU becomes a CUDA tensor).  Results are torch tensors; ``np.asarray(t)`` or
``jax.numpy.from_dlpack(t)`` takes them back without a copy (detach first where they need gradients).

Memory shared with a JAX array must not be written: JAX buffers are immutable.  tractfunc never writes
its inputs in place (new tensors everywhere), which is what makes the zero-copy path safe.
"""
from __future__ import annotations

import numpy as np
import torch

Tensor = torch.Tensor


def _from_numpy(a: np.ndarray) -> Tensor:
    """NumPy -> tensor sharing memory; a copy only where torch cannot view the array (negative strides,
    non-native byte order, as in big-endian NIfTI data, or a read-only array older NumPy cannot export)."""
    if a.dtype.isnative and min(a.strides, default=0) >= 0:
        if a.flags.writeable:
            return torch.from_numpy(a)
        try:
            return torch.from_dlpack(a)   # read-only: DLPack views it (from_numpy would warn)
        except BufferError:
            pass
    return torch.from_numpy(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("=")))


def as_tensor(x) -> Tensor:
    """``x`` as a torch tensor, sharing its memory where possible.

    x: a torch tensor (returned unchanged, autograd and torch.func wrappers included), a NumPy array or
    scalar (``torch.from_numpy``), any object with ``__dlpack__`` (JAX, CuPy: ``torch.from_dlpack``, same
    device), or Python numbers / nested sequences (a copy, ``torch.as_tensor``).  dtype and device follow
    the input."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (np.ndarray, np.generic)):
        return _from_numpy(np.asarray(x))
    if hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x)
    return torch.as_tensor(x)
