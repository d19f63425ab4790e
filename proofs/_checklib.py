"""Shared helpers of the proofs/check_*.py scripts: one ok/FAIL line per measured error, and the exit status.

The scripts are run as ``python proofs/check_<name>.py``, so this folder is on ``sys.path`` (from any working
directory) and they import from here with ``from _checklib import ...``.  Importing this module sets torch
to one intra-op thread.
"""
import sys

import torch

torch.set_num_threads(1)   # tiny tensors: intra-op threads only add overhead (and contention on shared CPUs)
failures = []              # names of the failed checks (scripts may also append to it directly)


def report(name, err, tol):
    """Print one ``ok``/``FAIL`` line for a measured error ``err`` against tolerance ``tol``; record failures."""
    ok = bool(err <= tol)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {err:.3e} (tol {tol:.0e})")
    if not ok:
        failures.append(name)


def finish(topic):
    """Exit with status 1 listing the failures if any, else print ``all <topic> checks passed``."""
    if failures:
        print(f"FAILED: {failures}")
        sys.exit(1)
    print(f"all {topic} checks passed")


def unit(v):
    """``v`` normalised along its last dimension."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
