"""The suite refuses to run when a parity reference does not import, rather than skipping the
tests that compare against it: a missing reference, or a missing dependency of one. And the
fast tier stays fast: a test that starts a process is marked slow."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import conftest
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hide(monkeypatch):
    """`hide(*names, reimport=())`: `import name` fails as if the package were not installed,
    and the modules in `reimport` are forgotten, so the next import runs them anew (and meets
    the hidden ones); all restored after the test."""
    def hide(*names, reimport=()):
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)  # import raises ModuleNotFoundError
        for name in reimport:
            monkeypatch.delitem(sys.modules, name, raising=False)

    monkeypatch.delenv(conftest.SKIP_REFERENCES_ENV, raising=False)
    return hide


def test_a_missing_reference_stops_the_run(hide):
    hide("torch")
    _, failed = conftest.import_references()
    assert list(failed) == ["torch"]
    with pytest.raises(pytest.UsageError,
                       match=r"do not import: torch \(ModuleNotFoundError.*torch==2\.13\.0"):
        conftest.require_references(failed)


def test_a_missing_dependency_of_a_reference_stops_the_run(hide, monkeypatch):
    # The book's chapter 5 imports tqdm, which jaxgpt does not use: once only transformers
    # brought it, and `importorskip("llms_from_scratch.ch05")` skipped the tests without it.
    hide("tqdm", reimport=["llms_from_scratch.ch05"])
    _, failed = conftest.import_references()
    assert list(failed) == ["tqdm", "llms_from_scratch.ch05"]
    assert "tqdm" in failed["llms_from_scratch.ch05"]
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv(conftest.SKIP_REFERENCES_ENV, "1")  # not honoured under CI
    with pytest.raises(pytest.UsageError, match=r"llms_from_scratch\.ch05 \(ModuleNotFound"
                                                r"Error: .*tqdm.*--no-deps llms-from-scratch"):
        conftest.require_references(failed)


def test_the_opt_out_is_refused_under_ci(monkeypatch):
    failed = {"torch": "ModuleNotFoundError: No module named 'torch'"}
    monkeypatch.setenv(conftest.SKIP_REFERENCES_ENV, "1")
    monkeypatch.setenv("CI", "false")
    conftest.require_references(failed)  # allowed outside CI
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.UsageError, match="not honoured under CI=true"):
        conftest.require_references(failed)


def test_reference_skips_only_under_the_opt_out(monkeypatch):
    monkeypatch.setattr(conftest, "IMPORTED", {"torch": sys.modules["torch"]})
    assert conftest.reference("torch") is sys.modules["torch"]
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv(conftest.SKIP_REFERENCES_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="ch05 did not import"):
        conftest.reference("llms_from_scratch.ch05")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="ch05 does not import"):
        conftest.reference("llms_from_scratch.ch05")
    with pytest.raises(KeyError, match="not in conftest.REFERENCES"):
        conftest.reference("tensorflow")  # every reference a test takes is imported at start


@pytest.mark.slow
def test_a_ci_run_without_a_dependency_of_a_reference_fails(tmp_path):
    """The whole mechanism, as CI meets it: pytest with tqdm missing exits with an error that
    names it, where the parity tests that need it were once reported skipped and pytest exited
    0 (a subprocess: the start-up import is what is tested)."""
    code = ("import sys; sys.modules['tqdm'] = None; import pytest; "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
            "'tests/test_chunked_loss.py::test_chunked_loss_grads_match_torch']))")
    env = dict(os.environ, CI="true", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop(conftest.SKIP_REFERENCES_ENV, None)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == pytest.ExitCode.USAGE_ERROR, res.stdout + res.stderr
    assert "llms_from_scratch.ch05 (ModuleNotFoundError" in res.stderr, res.stderr
    assert "skipped" not in res.stdout + res.stderr


def test_no_test_skips_on_a_failed_import():
    """`pytest.importorskip` skips on any ImportError, a missing dependency of the module
    included; tests take the references from `conftest.reference` instead."""
    here = Path(__file__)
    users = [p.name for p in sorted(here.parent.glob("*.py"))
             if p != here and "importorskip(" in p.read_text()]
    assert users == []


# --- the fast tier stays fast -------------------------------------------------------------------

_SPAWN = {"run", "Popen"}  # subprocess.run, subprocess.Popen
# A process made only to have the id of one that has ended, or to set a file's attributes,
# costs milliseconds: it is not a process under test.
_CHEAP = ("getpid", "chattr")


def _starts_processes(tree, source, inherited=frozenset()):
    """Names of the top-level functions and classes of a test module that start a process
    (a `subprocess.run`/`Popen` call, or a use of one that does: a helper, a fixture taken as
    an argument), `inherited` naming those defined elsewhere (conftest's fixtures)."""
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}

    def direct(node):
        for call in ast.walk(node):
            f = getattr(call, "func", None)
            if (isinstance(f, ast.Attribute) and f.attr in _SPAWN
                    and isinstance(f.value, ast.Name) and f.value.id == "subprocess"
                    and not any(c in ast.get_source_segment(source, call) for c in _CHEAP)):
                return True
        return False

    def used(node):
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        return names | {a.arg for n in ast.walk(node) if isinstance(n, ast.arguments)
                        for a in n.args}

    spawning = {name for name, node in defs.items() if direct(node)} | set(inherited)
    while True:
        more = {name for name, node in defs.items()
                if name not in spawning and used(node) & spawning}
        if not more:
            return spawning & set(defs)
        spawning |= more


def _unmarked_slow_tests(source, inherited=frozenset()):
    tree = ast.parse(source)
    if "pytestmark = pytest.mark.slow" in source:
        return []
    spawning = _starts_processes(tree, source, inherited)
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef)
            and n.name.startswith("test") and n.name in spawning
            and not any("mark.slow" in ast.unparse(d) for d in n.decorator_list)]


def test_every_test_that_starts_a_process_is_marked_slow():
    """The fast tier (`-m "not slow"`) starts no process: a test that runs the command line,
    a script or JAX in another process carries `@pytest.mark.slow` (pyproject.toml)."""
    here = Path(__file__).parent
    conftest_source = (here / "conftest.py").read_text()
    inherited = _starts_processes(ast.parse(conftest_source), conftest_source)
    assert "eight_devices" in inherited
    wrong = [f"{p.name}::{name}" for p in sorted(here.glob("test_*.py"))
             for name in _unmarked_slow_tests(p.read_text(), inherited)]
    assert wrong == [], f"start processes but are not marked slow: {wrong}"


def test_the_slow_check_sees_an_unmarked_process():
    # Positive control: through a helper and through a fixture, not for a finished pid.
    source = ("import os, subprocess\n"
              "def _cli(*a):\n    return subprocess.run(['jaxgpt', *a])\n"
              "def test_a():\n    _cli('info')\n"
              "def test_b(eight_devices):\n    pass\n"
              "def test_c():\n    subprocess.run(['python', '-c', 'import os; os.getpid()'])\n")
    assert _unmarked_slow_tests(source, {"eight_devices"}) == ["test_a", "test_b"]
    marked = source.replace("def test_a", "@pytest.mark.slow\ndef test_a")
    assert _unmarked_slow_tests(marked, {"eight_devices"}) == ["test_b"]
