"""Run every executable check of proofs/ (one derivation per gradient rule) and require exit code 0."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
CHECKS = sorted(glob.glob(os.path.join(ROOT, "proofs", "check_*.py")))


def test_checks_found():
    assert CHECKS, f"no proofs/check_*.py under {ROOT}"


@pytest.mark.parametrize("path", CHECKS, ids=[os.path.basename(p) for p in CHECKS])
def test_proof_check(path):
    r = subprocess.run([sys.executable, path], cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, (f"{os.path.relpath(path, ROOT)} exited with {r.returncode}\n"
                               f"--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}")
