"""The package's layout holds: imports flow one way, no module reaches into another's private
names, functions fit on a screen, and every table derived from `TrainConfig` stays derived.

The import rules read the source (the `ast` of every module), so they hold for imports inside
functions too.
"""

import ast
import dataclasses
import pathlib

import pytest

import jaxgpt
from jaxgpt.cli import build_parser
from jaxgpt.config import GPTConfig
from jaxgpt.nn.model import REMAT_MODES
from jaxgpt.training import run_dir
from jaxgpt.training.config import DTYPES, RESUME_KINDS, TrainConfig, resume_fields

PACKAGE = pathlib.Path(jaxgpt.__file__).parent
ROOT = PACKAGE.parent
# What each part of the package may import from jaxgpt (besides itself). Its tiers are the
# README's flow line, which `test_the_readme_flow_line_is_the_layering_table` holds to it.
# The foundations are modules at the package's root that import no part.
FOUNDATIONS = {"jaxgpt.config", "jaxgpt.tokenizer", "jaxgpt.sharding"}
ALLOWED = {
    "jaxgpt.nn": FOUNDATIONS,
    "jaxgpt.inference": FOUNDATIONS | {"jaxgpt.nn"},
    "jaxgpt.io": FOUNDATIONS | {"jaxgpt.nn"},
    "jaxgpt.book": FOUNDATIONS | {"jaxgpt.nn"},
    "jaxgpt.training": FOUNDATIONS | {"jaxgpt.nn", "jaxgpt.inference", "jaxgpt.io"},
    "jaxgpt.interp": FOUNDATIONS | {"jaxgpt.nn", "jaxgpt.inference"},
    "jaxgpt.aot": FOUNDATIONS | {"jaxgpt.nn", "jaxgpt.inference", "jaxgpt.training"},
    "jaxgpt.sae": FOUNDATIONS | {"jaxgpt.nn", "jaxgpt.inference", "jaxgpt.io", "jaxgpt.training",
                                 "jaxgpt.interp"},
    "jaxgpt.cli": FOUNDATIONS | {"jaxgpt.native_logs", "jaxgpt.nn", "jaxgpt.inference",
                                 "jaxgpt.io", "jaxgpt.training", "jaxgpt.interp", "jaxgpt.sae"},
}
# The files that state the flow line (`Data flows one way: ...` in the README).
FLOW_LINE_FILES = ["README.md", "docs/development.md"]
# Third-party packages only some parts may import (torch only where weights are converted).
FORBIDDEN = {"jaxgpt.nn": {"torch", "transformers", "optax", "orbax", "matplotlib"}}
MAX_FUNCTION_LINES = 60  # body without the docstring


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield name, path, ast.parse(path.read_text())


def _imports(tree, name):
    """`(module imported, names taken from it, line)` for every import in `tree`, resolved."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")[: -node.level] if not name.endswith("__init__") else []
                base = ".".join([*parent, base]).strip(".")
            yield base, [a.name for a in node.names], node.lineno


def _part(module):
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _graph():
    graph = {}
    for name, _, tree in _modules():
        deps = set()
        for module, names, _ in _imports(tree, name):
            if module == "jaxgpt":  # `from jaxgpt import nn` names a submodule
                deps |= {f"jaxgpt.{n}" for n in names if (PACKAGE / n).exists()
                         or (PACKAGE / f"{n}.py").exists()}
            elif module.startswith("jaxgpt."):
                folder = PACKAGE / module.split(".", 1)[1].replace(".", "/")
                submodules = {f"{module}.{n}" for n in names if (folder / f"{n}.py").exists()}
                # `from jaxgpt.x import y` of a submodule y depends on y, not on x's __init__.
                deps |= submodules if submodules and len(submodules) == len(names) else {module}
        graph[name] = deps
    return graph


def test_parts_import_only_the_parts_below_them():
    wrong = []
    for name, _, tree in _modules():
        part = _part(name)
        for module, _, line in _imports(tree, name):
            if module.startswith("jaxgpt") and part in ALLOWED:
                target = _part(module)
                if target != part and target != "jaxgpt" and target not in ALLOWED[part]:
                    wrong.append(f"{name}:{line} imports {module}")
            if module.split(".")[0] in FORBIDDEN.get(part, ()):
                wrong.append(f"{name}:{line} imports {module}")
    assert not wrong, wrong
    # Nothing but the command line (and `python -m jaxgpt`) imports the command line.
    users = {n for n, deps in _graph().items() if any(d.startswith("jaxgpt.cli") for d in deps)}
    assert users <= {n for n in _graph() if n.startswith("jaxgpt.cli")} | {"jaxgpt.__main__"}


def tiers(allowed):
    """The parts in tiers, lowest first: the foundations, then each part one tier above the
    highest it may import (a module beside them that no tier lists, as `native_logs`, counts
    with the foundations). `[{"config", ...}, {"nn"}, ...]`, names without `jaxgpt.`."""
    level = dict.fromkeys(FOUNDATIONS, 0)

    def place(part):
        if part not in level:
            level[part] = 1 + max(place(d) if d in allowed else 0 for d in allowed[part])
        return level[part]

    for part in allowed:
        place(part)
    return [{p.removeprefix("jaxgpt.") for p, n in level.items() if n == i}
            for i in range(max(level.values()) + 1)]


def flow_line(text):
    """The tiers a doc's flow line (`Data flows one way: `a <- {b, c} <- d``) states."""
    import re

    found = re.findall(r"`(\{?[a-z_]+(?:, [a-z_]+)*\}?(?: <- \{?[a-z_]+(?:, [a-z_]+)*\}?)+)`",
                       text)
    assert len(found) == 1, f"one flow line expected, found {found}"
    return [set(tier.strip("{}").split(", ")) for tier in found[0].split(" <- ")]


@pytest.mark.parametrize("doc", FLOW_LINE_FILES)
def test_the_readme_flow_line_is_the_layering_table(doc):
    assert flow_line((ROOT / doc).read_text()) == tiers(ALLOWED), (
        f"{doc}'s flow line and ALLOWED in tests/test_package.py disagree: change both")


def test_the_flow_line_check_sees_a_tier_out_of_place():
    # Positive control: an import allowed one tier higher moves the part, and the line says so.
    moved = {**ALLOWED, "jaxgpt.io": ALLOWED["jaxgpt.io"] | {"jaxgpt.inference"}}
    assert tiers(moved) != tiers(ALLOWED)
    assert flow_line("x `config <- nn <- {io, book}` y") == [{"config"}, {"nn"}, {"io", "book"}]


def test_the_foundations_import_no_part():
    root = {f"jaxgpt.{p.stem}" for p in PACKAGE.glob("*.py")} - {"jaxgpt.__init__",
                                                                  "jaxgpt.__main__"}
    assert FOUNDATIONS <= root
    wrong = [f"{name} imports {dep}" for name, deps in _graph().items() if name in root
             for dep in deps if dep not in root]
    assert not wrong, wrong


def test_the_layering_check_sees_a_wrong_import():
    # Positive control: an import that breaks the rule is found.
    tree = ast.parse("def f():\n    from jaxgpt.training.step import make_train_step\n")
    found = [m for m, _, _ in _imports(tree, "jaxgpt.nn.model")]
    assert found == ["jaxgpt.training.step"]
    assert _part(found[0]) not in ALLOWED["jaxgpt.nn"]


def test_no_import_cycle():
    graph = _graph()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == "open":
                pytest.fail(f"import cycle: {' -> '.join(path + [dep])}")
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_no_module_uses_another_modules_private_names():
    wrong = []
    for name, _, tree in _modules():
        imported = {}  # local name -> jaxgpt module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxgpt"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        wrong.append(f"{name} imports {node.module}.{alias.name}")
                    imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                wrong.append(f"{name} reads {imported[node.value.id]}.{node.attr}")
        assert "importlib.import_module" not in ast.unparse(tree), name
    assert not wrong, wrong


def test_functions_fit_on_a_screen():
    long = []
    for name, _, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    lines -= first.end_lineno - first.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_the_package_ships_its_type_information():
    assert (PACKAGE / "py.typed").is_file()


# --- one source for every table -------------------------------------------------------------------


def test_every_train_config_field_says_how_resume_treats_it():
    fields = dataclasses.fields(TrainConfig)
    for f in fields:
        assert f.metadata.get("resume") in RESUME_KINDS, f"TrainConfig.{f.name} is unclassified"
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help"
    by_kind = [name for kind in RESUME_KINDS for name in resume_fields(kind)]
    assert sorted(by_kind) == sorted(f.name for f in fields)
    assert "loss_chunk" in resume_fields("optim")


def test_resume_warns_about_every_changed_optimisation_setting(monkeypatch):
    # The tables written by hand left out loss_chunk: a resumed run with another --loss-chunk
    # got no warning. Every optimisation and loop field is compared now.
    cfg = GPTConfig(vocab_size=50, context_length=8, emb_dim=8, n_heads=2, n_layers=1)
    saved = TrainConfig(batch_size=4, seq_len=8)
    monkeypatch.setattr(run_dir.checkpoint, "load_config", lambda path: cfg)
    monkeypatch.setattr(run_dir.checkpoint, "load_metadata",
                        lambda path: {"train": saved.to_dict()})
    changed = {"loss_chunk": 64, "lr": 1e-3, "eps": 1e-6, "keep": 5, "sample_top_k": 3}
    lines = run_dir.resume_changes("ckpt", cfg, saved.replace(**changed))
    names = sorted(line.split()[0] for line in lines)
    assert names == sorted(f"TrainConfig.{name}" for name in changed)
    assert run_dir.resume_changes("ckpt", cfg, saved) == []
    with pytest.raises(ValueError, match="^TrainConfig.seed must stay 123 to resume ckpt.*got 5$"):
        run_dir.resume_changes("ckpt", cfg, saved.replace(seed=5))


def test_train_flags_take_their_defaults_and_choices_from_train_config():
    args = build_parser().parse_args(["train"])
    flags = {a.dest: a for a in build_parser()._subparsers._group_actions[0]
             .choices["train"]._actions}
    plain = ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "grad_clip",
             "grad_accum", "eval_every", "eval_iters", "save_every", "keep", "seed", "dtype",
             "remat", "fsdp", "loss_chunk", "sample_tokens", "stride", "min_lr")
    for name in plain:
        assert getattr(args, name) == TrainConfig.__dataclass_fields__[name].default, name
    assert args.prompt == TrainConfig().sample_prompt
    assert args.val_ratio == pytest.approx(1 - TrainConfig().train_ratio)
    assert tuple(flags["dtype"].choices) == tuple(DTYPES)
    assert tuple(flags["remat"].choices) == REMAT_MODES
    assert f"(default {TrainConfig().steps})" in flags["steps"].help
    # Help is written once, on the field; the flag adds what only it has.
    for name in plain:
        field = TrainConfig.__dataclass_fields__[name]
        assert flags[name].help.startswith(field.metadata["help"]), name
        if field.default is None:  # the help says what None means
            assert flags[name].help.endswith(f"(default {field.metadata['none']})"), name
    assert flags["remat"].help == (TrainConfig.__dataclass_fields__["remat"].metadata["help"]
                                   + "; --remat alone: block (default attention on GPU/TPU, "
                                     "none on CPU)")


def test_every_train_flag_reaches_its_train_config_field():
    from jaxgpt.cli.train import _SETTINGS, _train_config

    argv = ["train", "--steps", "7", "--batch-size", "6", "--seq-len", "12", "--stride", "5",
            "--lr", "0.01", "--min-lr", "0.001", "--warmup-steps", "2", "--weight-decay", "0.2",
            "--grad-clip", "0", "--grad-accum", "3", "--eval-every", "4", "--eval-iters", "2",
            "--save-every", "3", "--keep", "1", "--seed", "9", "--val-ratio", "0.25",
            "--dtype", "bfloat16", "--remat", "--fsdp", "--loss-chunk", "64",
            "--prompt", "Hi", "--sample-tokens", "0"]
    cfg = GPTConfig(vocab_size=50, context_length=16, emb_dim=8, n_heads=2, n_layers=1)
    tc = _train_config(build_parser().parse_args(argv), cfg)
    assert tc == TrainConfig(
        steps=7, batch_size=6, seq_len=12, stride=5, lr=0.01, min_lr=0.001, warmup_steps=2,
        weight_decay=0.2, grad_clip=None, grad_accum=3, eval_every=4, eval_iters=2,
        save_every=3, keep=1, seed=9, train_ratio=0.75, dtype="bfloat16", remat="block",
        fsdp=True, loss_chunk=64, sample_prompt="Hi", sample_tokens=0)
    assert {name for name, _, _ in _SETTINGS} <= set(TrainConfig.__dataclass_fields__)
    # --seq-len left out: the config's default, cut to the model's context.
    assert _train_config(build_parser().parse_args(["train"]), cfg).seq_len == 16

