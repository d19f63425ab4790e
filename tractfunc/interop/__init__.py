"""Bridges to other frameworks: :mod:`tractfunc.interop.jax` (JAX-callable primitives and tracking)."""
