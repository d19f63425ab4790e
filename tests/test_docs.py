"""Every fenced code block of README.md and docs/*.md runs on its own.

Each ```python block runs alone in a fresh interpreter (cwd: an empty temporary directory next to a
``shared`` link, so ``../shared/data/...`` reaches the real data as from a checkout; PYTHONPATH: the
repository root) and must exit 0. Where the block is followed directly by a ```text block, its stdout must
match that text (numbers to a relative 1e-3). Markers, in the fence's info string (```python no-run) or in
an HTML comment on the line just above the fence (<!-- docs-test: no-run -->):

* ``no-run``: the block cannot run here (a GPU, torchrun, a large download, a placeholder file name); it
  is counted, and there must be few of them (``MAX_NO_RUN``);
* ``slow``: the block takes more than 10 s; it runs only with ``-m slow``.

The selected blocks start together, ``TRACTFUNC_DOCS_WORKERS`` (2) at a time, one thread each.

```bash blocks are not executed; every ``tractfunc SUBCOMMAND`` they name must exist
(``python -m tractfunc.cli SUBCOMMAND --help`` exits 0).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import IN_CI

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT_S = 60          # per block; a block over 10 s is marked slow
SLOW_TIMEOUT_S = 600
MAX_NO_RUN = 3
WORKERS = int(os.environ.get("TRACTFUNC_DOCS_WORKERS", "2"))   # blocks run at once
README_MAX_LINES = 150

FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*(.*?)\s*$")
MARKER = re.compile(r"<!--\s*docs-test:\s*([\w\s,-]+?)\s*-->")
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


class Block(NamedTuple):
    file: str          # relative to the repository root
    line: int          # 1-based line of the opening fence
    lang: str
    flags: frozenset
    code: str
    output: str | None  # the ```text block right after it, if any

    @property
    def name(self) -> str:
        return f"{self.file}:{self.line}"


def parse(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, in order (indented fences inside lists included)."""
    lines = path.read_text().splitlines()
    rel = str(path.relative_to(ROOT))
    raw = []   # (line, lang, flags, code, end line)
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, info = m.group(1), m.group(2).lower(), m.group(3)
        flags = set(info.replace(",", " ").split())
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0 and (mk := MARKER.search(lines[j])):
            flags |= set(mk.group(1).replace(",", " ").split())
        k = i + 1
        while k < len(lines) and lines[k].strip() != "```":
            k += 1
        if k == len(lines):
            raise AssertionError(f"{rel}:{i + 1}: unclosed code fence")
        body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1:k]]
        raw.append((i + 1, lang, frozenset(flags), "\n".join(body) + "\n", k + 1))
        i = k + 1
    blocks = []
    for n, (line, lang, flags, code, end) in enumerate(raw):
        output = None
        if n + 1 < len(raw) and raw[n + 1][1] == "text":
            between = lines[end:raw[n + 1][0] - 1]
            if all(not s.strip() for s in between):
                output = raw[n + 1][3]
        blocks.append(Block(rel, line, lang, flags, code, output))
    return blocks


BLOCKS = [b for f in FILES for b in parse(f)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]
RUNNABLE = [b for b in PYTHON if "no-run" not in b.flags]
NO_RUN = [b for b in PYTHON if "no-run" in b.flags]


def _param(b: Block):
    return pytest.param(b, id=b.name, marks=[pytest.mark.slow] if "slow" in b.flags else [])


def _same_output(got: str, want: str, rtol: float = 1e-3, atol: float = 1e-6) -> bool:
    """Text equal up to whitespace runs, numbers equal to ``rtol``."""
    norm = lambda s: " ".join(s.split())
    g, w = norm(got), norm(want)
    if NUMBER.sub("#", g) != NUMBER.sub("#", w):
        return False
    return all(abs(float(a) - float(b)) <= atol + rtol * abs(float(b))
               for a, b in zip(NUMBER.findall(g), NUMBER.findall(w)))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("OMP_NUM_THREADS", "1")   # blocks run side by side; idle intra-op threads spin on shared cores
    return env


def _run(block: Block, tmp: Path) -> subprocess.CompletedProcess:
    """Run one block in a fresh interpreter; cwd ``tmp/checkout`` next to ``tmp/shared`` -> ../shared."""
    cwd = tmp / "checkout"
    cwd.mkdir()
    if SHARED.is_dir():
        (tmp / "shared").symlink_to(SHARED, target_is_directory=True)
    script = cwd / "block.py"
    script.write_text(block.code)
    timeout = SLOW_TIMEOUT_S if "slow" in block.flags else TIMEOUT_S
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def block_runs(request, tmp_path_factory):
    """Every selected block started up front, WORKERS at a time (each block in its own subprocess, one
    thread each), so the blocks' start-up (imports, the phantom) overlaps on a multi-core machine."""
    selected = [item.callspec.params["block"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_python_block_runs_alone"]
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures = {b.name: pool.submit(_run, b, tmp_path_factory.mktemp("block")) for b in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("block", [_param(b) for b in RUNNABLE])
def test_python_block_runs_alone(block: Block, block_runs):
    if "../shared/data" in block.code and not (SHARED / "data").is_dir():
        msg = f"{block.name} needs the real data at {SHARED / 'data'}"
        pytest.fail(msg) if IN_CI else pytest.skip(msg)
    try:
        r = block_runs[block.name].result()
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.name}: over {e.timeout} s")
    if r.returncode != 0:
        pytest.fail(f"{block.name} exited {r.returncode}; stderr tail:\n{r.stderr[-3000:]}", pytrace=False)
    if block.output is not None and not _same_output(r.stdout, block.output):
        pytest.fail(f"{block.name} printed\n{r.stdout}\nbut the text shows\n{block.output}", pytrace=False)


def test_no_run_blocks_are_few():
    assert len(NO_RUN) <= MAX_NO_RUN, "python blocks marked no-run: " + ", ".join(b.name for b in NO_RUN)


def test_every_block_has_a_language():
    bare = [b.name for b in BLOCKS if not b.lang]
    assert not bare, f"code fences without a language (python, bash, text, ...): {bare}"


def _subcommands() -> dict[str, set[str]]:
    """{subcommand: the --options given to it} over every ```bash block."""
    uses: dict[str, set[str]] = {}
    for b in BLOCKS:
        if b.lang not in ("bash", "sh", "shell", "console"):
            continue
        for line in b.code.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0]
            for sub, rest in re.findall(r"(?:^|[\s/;&|(])tractfunc(?:\.cli)?\s+([a-z][\w-]*)(.*)", line):
                uses.setdefault(sub, set()).update(re.findall(r"(?<![\w-])--[a-z][\w-]*", rest))
    return uses


SUBCOMMANDS = _subcommands()


@pytest.mark.parametrize("sub", sorted(SUBCOMMANDS))
def test_bash_blocks_name_real_subcommands(sub):
    """`tractfunc SUB --help` exits 0 and lists every option the bash blocks give SUB."""
    r = subprocess.run([sys.executable, "-m", "tractfunc.cli", sub, "--help"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"`tractfunc {sub} --help` exited {r.returncode}: {r.stderr[-1000:]}"
    unknown = sorted(o for o in SUBCOMMANDS[sub] if not re.search(re.escape(o) + r"(?![\w-])", r.stdout))
    assert not unknown, f"`tractfunc {sub}` options in the docs that its --help does not list: {unknown}"


def test_readme_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    first = next(b for b in BLOCKS if b.file == "README.md")
    assert first.lang == "bash" and first.code.splitlines() == [
        "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e '.[test]' && "
        ".venv/bin/tractfunc demo --out tractfunc_demo",
        ".venv/bin/python -m pytest -q"]


def test_links_resolve():
    missing = []
    for f in FILES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", f.read_text()):
            if "://" not in target and not (f.parent / target).exists():
                missing.append(f"{f.relative_to(ROOT)} -> {target}")
    assert not missing, missing


def _resolves(dotted: str) -> bool:
    """Whether ``tractfunc.a.b.c`` names an importable module or an attribute of one."""
    import importlib
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        if not Path(getattr(obj, "__file__", "") or ROOT).resolve().is_relative_to(ROOT):
            return False   # found elsewhere on the path (another checkout), not in this one
        try:
            for attr in parts[n:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_named_python_api_exists():
    """Every `tractfunc.x.y` the text names (in backticks) is a module or an attribute that exists."""
    names = {m for f in FILES for m in re.findall(r"`(tractfunc(?:\.[A-Za-z_]\w*)+)", f.read_text())}
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"named in the docs but not in the package: {missing}"
