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
    ("config: schemas, validation, constants", ["rpg.config", "rpg.config_ranges", "rpg.mechanisms"]),
    ("data", ["rpg.data", "rpg.toy_task"]),
    ("tracking and run identity", ["rpg.tracking", "rpg.tracking_base", "rpg.tracking_store", "rpg.tracking_server",
                                   "rpg.run_meta"]),
    ("models", ["rpg.models", "rpg.warmstart", "rpg.logprobs"]),
    ("backends and checkpoints", ["rpg.backend", "rpg.checkpoint"]),
    ("one rank's training loop", ["rpg.train", "rpg.learner", "rpg.update", "rpg.rollouts", "rpg.reference",
                                  "rpg.build", "rpg.evaluation", "rpg.evaluate"]),
    ("whoever starts processes", ["rpg.launch", "rpg.ranks", "rpg.sweep", "rpg.plan"]),
    ("entry point", ["rpg.main"]),
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
            # `from rpg import checkpoint` imports the module rpg.checkpoint
            out |= {f"rpg.{a.name}" for a in node.names} if node.module == "rpg" else {node.module}
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
    bad.write_text("def f():\n    from rpg.train import run\n    from rpg import checkpoint\n")
    assert imported_modules(bad) == {"rpg.train", "rpg.checkpoint"}
    assert layer_of("rpg.train") > layer_of("rpg.backend.fsdp") > layer_of("rpg.core.losses")
