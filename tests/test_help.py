"""``--help`` (conf/hydra/help/rpg.yaml), the schemas behind it (rpg.config.register_configs), the ``rpg``
console script and scripts/setup.sh's torch index."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException, MissingConfigException

from rpg.config import CONF_DIR, register_configs

ROOT = Path(CONF_DIR).parent
GROUPS = ("algo", "model", "data", "engine", "context", "cluster")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def files_of(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def listed_groups(text: str) -> dict[str, list[str]]:
    """The ``group: a, b, c`` lines of the help's config-groups section."""
    section = text.split("== Config groups", 1)[1].split("\n==", 1)[0]
    return {m[1]: m[2].split(", ") for m in re.finditer(r"^([\w/]+): (.+)$", section, re.M)}


@pytest.fixture(scope="module")
def help_text(tmp_path_factory) -> str:
    out = subprocess.run([sys.executable, "-m", "rpg.main", "--help"], cwd=tmp_path_factory.mktemp("help"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_help_lists_each_group_with_its_files(help_text):
    groups = listed_groups(help_text)
    assert set(groups) == set(GROUPS), groups
    for g in GROUPS:
        assert groups[g] == files_of(g), g
    assert "_schema" not in help_text


def test_help_is_the_projects(help_text):
    assert "powered by Hydra" not in help_text
    for needle in ("dry_run=true", "-m algo=", "seed=", "steps=", "resume=auto", "resume=never", "outputs/",
                   "multirun/", "mlflow ui --backend-store-uri sqlite:///mlflow.db", "README.md",
                   "docs/algorithms.md"):
        assert needle in help_text, needle
    assert "This command's: algo=rpg_rf_urkl model=tiny data=toy engine=cpu" in help_text


def test_help_follows_the_overrides(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rpg.main", "--help", "algo=grpo", "engine=gpu"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "This command's: algo=grpo model=tiny data=toy engine=gpu" in out.stdout


def test_no_schema_is_a_choice():
    register_configs()
    repo = ConfigStore.instance().repo
    assert "run_schema.yaml" in repo
    for g in GROUPS:
        assert not any("schema" in name for name in repo.get(g, {})), (g, sorted(repo.get(g, {})))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for g, name in [("algo", "algo_schema"), ("model", "model_schema"), ("data", "data_schema"),
                        ("engine", "engine_schema")]:
            with pytest.raises(MissingConfigException, match=f"Could not find '{g}/{name}'"):
                compose(config_name="config", overrides=[f"{g}={name}"])


def test_group_files_are_still_checked_against_the_schema(tmp_path):
    """A misspelt key in a group's file fails at composition (RunConfig types algo, model, data, engine)."""
    register_configs()
    for group, good, key in [("algo", "grpo", "clip_high"), ("model", "tiny", "kind"), ("data", "toy", "reward"),
                             ("engine", "cpu", "device")]:
        (tmp_path / group).mkdir()
        text = (Path(CONF_DIR) / group / f"{good}.yaml").read_text()
        assert re.search(rf"^{key}:", text, re.M), (group, key)
        (tmp_path / group / "typo.yaml").write_text(re.sub(rf"^{key}:", f"{key}x:", text, flags=re.M))
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            with pytest.raises(ConfigCompositionException, match=f"Key '{key}x' not in"):
                compose(config_name="config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", f"{group}=typo"])


def test_rpg_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["rpg"] == "rpg.main:main"
    exe = shutil.which("rpg", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the project is not installed in this environment (pip install -e .)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("rpg: KL-regularized")


def setup_commands(**env) -> list[str]:
    """The commands scripts/setup.sh would run (RPG_SETUP_DRY_RUN=1: printed, none run)."""
    base = {k: v for k, v in os.environ.items() if k != "RPG_TORCH_INDEX_URL"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], env={**base, "RPG_SETUP_DRY_RUN": "1", **env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]


def test_setup_installs_torch_first_and_exactly():
    pips = [c for c in setup_commands() if c.startswith("pip install")]
    assert pips[-2:] == ["pip install -q torch==2.13.0", "pip install -q -e .[dev]"], pips
    assert not any("--index-url" in c for c in pips)


def test_setup_takes_torch_from_the_index_it_is_given():
    pips = [c for c in setup_commands(RPG_TORCH_INDEX_URL=CPU_INDEX) if c.startswith("pip install")]
    assert pips[-2:] == [f"pip install -q --index-url {CPU_INDEX} torch==2.13.0", "pip install -q -e .[dev]"], pips
