"""The package stays layered: every module imports only from its own layer or the ones below, and stays
small.  Lazy imports inside functions count too (that is how the old train <-> spawn cycle hid)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: bottom to top; a module not listed fails the test (place it in a layer)
LAYERS = [
    ("pure math and rollout engines", ["rpg.core", "rpg.rollout"]),
    ("rewards", ["rpg.rewards"]),
    ("config: schemas, ranges, validation, mechanisms", ["rpg.config"]),
    ("data: prompts, the toy task", ["rpg.data"]),
    ("tracking and run identity", ["rpg.tracking"]),
    ("models: tiny model, warm start, log-probs", ["rpg.models"]),
    ("backends and checkpoints", ["rpg.backend"]),
    ("one rank's training loop", ["rpg.train"]),
    ("whoever starts processes", ["rpg.launch"]),
    ("entry points", ["rpg.main", "rpg.sweep"]),
]
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "rpg"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "rpg":
            # `from rpg.launch import sweep` imports the module rpg.launch.sweep (a name that is not a
            # module, as in `from rpg.config import ConfigError`, falls into its module's layer)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


MODULES = sorted(p for p in (ROOT / "rpg").rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in MODULES if module_name(p) != "rpg" and layer_of(module_name(p)) is None]
    assert not unplaced, f"place these modules in a layer of tests/test_layers.py: {unplaced}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    mine = layer_of(module_name(path))
    up = [(m, LAYERS[layer_of(m)][0]) for m in sorted(imported_modules(path))
          if layer_of(m) is not None and mine is not None and layer_of(m) > mine]
    assert not up, f"{module_name(path)} ({LAYERS[mine][0]}) imports from higher layers: {up}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path.name}: split it (over {MAX_LINES} lines)"


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from rpg.train.loop import run\n    from rpg.backend import checkpoint\n")
    assert imported_modules(bad) == {"rpg.train.loop.run", "rpg.backend.checkpoint"}
    assert layer_of("rpg.train.loop.run") > layer_of("rpg.backend.fsdp") > layer_of("rpg.core.losses")


def test_the_package_tree_shows_the_layers():
    """Every module lives in its layer's package; only the entry points sit at the top."""
    top = {p.stem for p in (ROOT / "rpg").glob("*.py")}
    assert top == {"__init__", "main", "sweep"}, f"move into a layer package: {sorted(top - {'__init__', 'main', 'sweep'})}"
    packages = {p.name for p in (ROOT / "rpg").iterdir() if (p / "__init__.py").is_file()}
    assert packages == {m.split(".")[1] for _, prefixes in LAYERS for m in prefixes} - {"main", "sweep"}


def test_every_backend_implements_the_train_backend_protocol():
    import inspect

    from rpg.backend import TrainBackend
    from rpg.backend.fsdp import FSDPBackend
    from rpg.backend.local import LocalBackend

    methods = [n for n, f in vars(TrainBackend).items() if inspect.isfunction(f) and not n.startswith("_")]
    assert len(methods) >= 14
    for cls in (LocalBackend, FSDPBackend):
        for name in methods:
            want = list(inspect.signature(getattr(TrainBackend, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls.__name__, name)
    assert isinstance(LocalBackend(), TrainBackend)
