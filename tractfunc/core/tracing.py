"""Whether code is running under torch.compile or a torch.func transform.

Eager-only shortcuts (active sets, early exits) consult :func:`is_tracing` and fall back to the
fixed-shape, branch-free path when it is True."""
import torch


def is_tracing(*tensors: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return True
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def needs_grad(*tensors: torch.Tensor) -> bool:
    """True when a derivative may be taken through these tensors: autograd (requires_grad) or a
    torch.func transform (functorch-wrapped).  Static under torch.compile."""
    return any(t.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)
