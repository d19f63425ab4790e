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


def is_vectorized(*tensors: torch.Tensor) -> bool:
    """True under ``torch.compile`` or when a ``torch.func.vmap`` level wraps any of these tensors (at any depth of
    functorch wrapping): where only fixed-shape, traceable code may run (``grad`` / ``vjp`` alone are not)."""
    if torch.compiler.is_compiling():
        return True
    F = torch._C._functorch
    for t in tensors:
        while F.is_functorch_wrapped_tensor(t):
            if F.is_batchedtensor(t):
                return True
            t = F.get_unwrapped(t)
    return False


def live_tangent(t) -> bool:
    """Whether a forward-mode tangent (from an ``autograd.Function``'s ``jvp``) can be non-zero: a batched one
    (``jacfwd`` wrt that input), or a plain one with a non-zero entry (torch.func passes zeros for the inputs it does
    not move; None when there is none)."""
    if t is None:
        return False
    if is_vectorized(t):
        return True
    with torch._C._DisableFuncTorch():
        return bool(unwrap(t).any())


def unwrap(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under any torch.func wrappers of ``t`` (its primal value, for code that leaves PyTorch)."""
    F = torch._C._functorch
    while F.is_functorch_wrapped_tensor(t):
        t = F.get_unwrapped(t)
    return t
