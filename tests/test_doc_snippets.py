"""Every Python snippet of the README and docs/ runs as written.

Each doc's ```python blocks (and `>>>` lines, if a doc has any) run in order in one namespace,
in a fresh interpreter of their own, in a temporary directory holding `gpt2/`: a small random
`GPT2LMHeadModel` saved by transformers' `save_pretrained`, standing in for the real GPT-2
directory the docs load (`load_pretrained("gpt2")`; no network here). It has GPT-2's
vocabulary, 12 layers and 12 heads, so the docs' token ids, layer and head numbers hold; only
its width (48, not 768) and context (128) are small. A block that cannot run here is marked in
the doc itself, right before it, with `<!-- snippet: skip (why) -->`; SKIPPED lists them all.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
from conftest import reference

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
SKIP = re.compile(r"^<!--\s*snippet:\s*skip\s*\((.+)\)\s*-->$")
PYTHON = {"python", "py", "pycon"}
# Every block the docs mark as not runnable here, by doc and the doc's reason: adding one is a
# decision this list records.
SKIPPED = [
    ("checkpoints.md", "needs the network"),
    ("training.md", "needs a cluster: jax.distributed.initialize reads its environment"),
]
# A doc's snippets together, at most (the README's run the real 124M model, random weights).
DOC_TIMEOUT_S = 600
# The stand-in for GPT-2's directory: GPT-2's vocabulary, layer and head counts.
SMALL_GPT2 = dict(vocab_size=50257, n_positions=128, n_embd=48, n_head=12, n_layer=12)


@dataclass(frozen=True)
class Snippet:
    doc: str
    line: int  # of the opening fence, 1-based
    code: str
    skip: str | None  # the reason, where the doc marks it


def snippets(path: pathlib.Path) -> list[Snippet]:
    """The Python snippets of a Markdown file: ```python blocks whole, and the `>>>`/`...`
    lines of any other block (as doctest reads them), each with its skip marker."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2).lower(), i
        end = start + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = [line[len(indent):] if line.startswith(indent) else line
                for line in lines[start + 1:end]]
        if any(b.lstrip().startswith(">>>") for b in body):  # a session: its input lines
            body = [b.lstrip()[4:] for b in body if b.lstrip()[:3] in (">>>", "...")]
            lang = "pycon"
        if lang in PYTHON:
            before = start - 1
            while before >= 0 and not lines[before].strip():
                before -= 1
            skip = SKIP.match(lines[before].strip()) if before >= 0 else None
            found.append(Snippet(path.name, start + 1, textwrap.dedent("\n".join(body)) + "\n",
                                 skip.group(1) if skip else None))
        i = end + 1
    return found


# Runs the snippets it reads from stdin (JSON: [[name, code], ...]) in one namespace, in order;
# on the first failure prints the snippet's name and the traceback, and exits 1.
_CHILD = """
import json, sys, traceback
namespace = {"__name__": "__main__"}
for name, code in json.loads(sys.stdin.read()):
    print(f"--- {name}", flush=True)
    try:
        exec(compile(code, name, "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: {name}", file=sys.stderr, flush=True)
        sys.exit(1)
print("--- all ran", flush=True)
"""


def run_snippets(items: list[Snippet], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """The snippets' code, in order, in one fresh interpreter run in `cwd`."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               XDG_CACHE_HOME=str(cwd / ".cache"))
    # The names tell where a failure is: the doc and the line of the block's opening fence.
    payload = json.dumps([[f"{s.doc}:{s.line}", s.code] for s in items])
    try:
        return subprocess.run([sys.executable, "-c", _CHILD], input=payload, cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=DOC_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        ran = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        last = [line for line in ran.splitlines() if line.startswith("--- ")][-1:]
        pytest.fail(f"the snippets ran past {DOC_TIMEOUT_S} s, in {last}", pytrace=False)


@pytest.fixture(scope="module")
def small_gpt2(tmp_path_factory) -> pathlib.Path:
    """A Hugging Face GPT-2 directory of a small random model (transformers' own files)."""
    torch = reference("torch")
    transformers = reference("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SMALL_GPT2)).eval()
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(path)
    return path


DOCS_WITH_SNIPPETS = [doc for doc in DOCS if any(s.skip is None for s in snippets(doc))]


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS_WITH_SNIPPETS, ids=lambda p: p.name)
def test_every_python_snippet_of_a_doc_runs_as_written(doc, small_gpt2, tmp_path):
    shutil.copytree(small_gpt2, tmp_path / "gpt2")
    proc = run_snippets([s for s in snippets(doc) if s.skip is None], tmp_path)
    assert proc.returncode == 0, f"{doc.name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.rstrip().endswith("--- all ran")


def test_the_skipped_snippets_are_the_listed_ones():
    marked = [(s.doc, s.skip) for doc in DOCS for s in snippets(doc) if s.skip]
    assert marked == SKIPPED
    # Every doc with Python in it is run (a doc of shell commands only has none).
    names = {doc.name for doc in DOCS_WITH_SNIPPETS}
    assert {"README.md", "generation.md", "research.md", "training.md", "sae.md",
            "checkpoints.md", "accelerators.md"} <= names


def test_snippets_are_found_with_their_skip_markers(tmp_path):
    # Positive control for the parser: fences of each kind, a marker, `>>>` lines.
    doc = tmp_path / "a.md"
    doc.write_text(textwrap.dedent("""\
        # A doc
        ```python
        x = 1
        ```
        ```bash
        echo not python
        ```
        <!-- snippet: skip (needs a TPU) -->

        ```python
        tpu()
        ```
        - a list item's block:
          ```python
          y = x + 1
          ```
        ```
        >>> z = y * 2
        >>> z
        4
        ```
        """))
    found = snippets(doc)
    assert [(s.line, s.code, s.skip) for s in found] == [
        (2, "x = 1\n", None), (10, "tpu()\n", "needs a TPU"), (14, "y = x + 1\n", None),
        (17, "z = y * 2\nz\n", None)]


@pytest.mark.slow
def test_a_snippet_that_fails_is_named(tmp_path):
    # Positive control for the runner: a later block sees an earlier one's names, and a
    # failing block fails the run with its doc and line.
    items = [Snippet("a.md", 2, "x = 1\n", None), Snippet("a.md", 9, "assert x == 1\n", None),
             Snippet("a.md", 20, "undefined_name\n", None)]
    proc = run_snippets(items, tmp_path)
    assert proc.returncode == 1
    assert "FAILED: a.md:20" in proc.stderr and "NameError" in proc.stderr
    assert run_snippets(items[:2], tmp_path).stdout.rstrip().endswith("--- all ran")
