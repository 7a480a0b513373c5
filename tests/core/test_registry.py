"""The registries are fully covered: every registered loss declares what the tests need to check it (its
family and divergence), a newly registered variant is picked up by the whole core suite without editing
any list, every name the project's configs use is registered; aliases share their function's tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rpg.core.advantages import ADVANTAGES
from rpg.core.losses import POLICY_LOSSES

from .helpers import LOSS_NAMES, case, primary_name

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_registered_loss_declares_its_family(name):
    assert case(name).family


THROWAWAY = """
from rpg.core.losses import POLICY_LOSSES
from rpg.core.registry import member
from rpg.core.rpg_losses import reinforce_loss


@member("rf", "urkl")
def rpg_rf_throwaway(logp, old_logp, ref_logp, advantages, mask, params, totals=None, token_weights=None):
    return reinforce_loss("{body}", logp, old_logp, ref_logp, advantages, mask, params, totals, token_weights)


POLICY_LOSSES.register("rpg_rf_throwaway")(rpg_rf_throwaway)
"""


def run_core_suite_with(tmp_path, body: str) -> tuple[int, str]:
    (tmp_path / "throwaway_variant.py").write_text(THROWAWAY.format(body=body))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "throwaway_variant", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "core"), "-k", "throwaway"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout[-3000:]


def test_a_new_variant_is_tested_by_registering_it(tmp_path):
    # one function, registered: the core suite runs its exact-gradient, Proposition 4.1, clip, dtype,
    # aggregation and bad-input tests with no list to edit ...
    code, out = run_core_suite_with(tmp_path, body="urkl")
    passed = int(re.search(r"(\d+) passed", out).group(1))
    assert code == 0 and passed >= 20 and "failed" not in out, out
    # ... and they are real: the same variant computing another divergence than it declares fails them
    code, out = run_core_suite_with(tmp_path, body="rkl")
    assert code != 0 and int(re.search(r"(\d+) failed", out).group(1)) >= 5, out


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


def test_every_loss_parameter_is_an_algo_setting():
    # rpg.config.loss_params copies LossParams' fields from algo.* by name: each must exist there
    from dataclasses import fields

    from rpg.config import AlgoConfig
    from rpg.core.losses import LossParams

    assert {f.name for f in fields(LossParams)} <= {f.name for f in fields(AlgoConfig)}
