"""The registries are fully covered: every registered loss has a test case (CASES) and every name the
project's configs use is registered; aliases are the same function, so they share its tests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rpg.core.advantages import ADVANTAGES
from rpg.core.losses import POLICY_LOSSES

from .helpers import CASES, LOSS_NAMES, case, primary_name

ROOT = Path(__file__).resolve().parents[2]


def test_every_registered_loss_has_a_test_case_and_back():
    assert set(POLICY_LOSSES) == set(CASES), "add the new name to CASES in tests/core/helpers.py"


def test_algorithm_names_of_the_project_are_registered():
    algos = {"rpg_fkl", "rpg_rkl", "rpg_ufkl", "rpg_urkl", "rpg_rf_fkl", "rpg_rf_rkl", "rpg_rf_ufkl",
             "rpg_rf_urkl", "grpo", "grpo_is", "dapo", "reinforce_pp", "reinforce_pp_baseline"}
    assert algos <= set(POLICY_LOSSES)


def test_conf_algo_files_name_registered_losses_and_advantages():
    files = sorted((ROOT / "conf" / "algo").glob("*.yaml"))
    if not files:
        pytest.skip("no conf/algo/*.yaml in this checkout")
    for f in files:
        text = f.read_text()
        loss = re.search(r"^loss:\s*(\S+)", text, re.M).group(1)
        adv = re.search(r"^advantage:\s*(\S+)", text, re.M).group(1)
        assert loss in POLICY_LOSSES and adv in ADVANTAGES, f.name


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_aliases_share_function_and_case(name):
    primary = primary_name(name)
    assert case(name) == case(primary)
    if primary != name:
        assert POLICY_LOSSES[name] is POLICY_LOSSES[primary]
