"""Every numeric and enumerated setting has a declared range, and an out-of-range value of each is refused
before any work with a message naming the key, the value and the range (the schema is walked, so a new
field without a range fails here)."""

from __future__ import annotations

import typing
from dataclasses import fields

import pytest
from omegaconf import OmegaConf

from rpg.config import ConfigError, RunConfig, validate
from rpg.config.ranges import EVAL_SET_RANGES, RANGES, describe

#: free-form or non-numeric settings: names, paths, switches, nested mappings
UNRANGED = {"algo.name", "model.name", "model.path", "model.warm_start", "model.arch", "data.name",
            "data.train_path", "data.eval_sets", "engine.name", "tracking.uri", "tracking.experiment",
            "out_dir", "sweep", "name", "cache_dir"}


def leaf_fields(schema, prefix=""):
    for f in fields(schema):
        kind = typing.get_type_hints(schema)[f.name]
        if hasattr(kind, "__dataclass_fields__"):
            yield from leaf_fields(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", kind


def base(kind):
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) is typing.Union else kind


LEAVES = dict(leaf_fields(RunConfig))


def test_every_numeric_and_enumerated_setting_has_a_range():
    missing = [k for k, kind in LEAVES.items()
               if base(kind) is not bool and k not in RANGES and k not in UNRANGED]
    assert not missing, f"declare a range in rpg/config/ranges.py RANGES for {missing}"
    assert not set(RANGES) - set(LEAVES), "RANGES names settings the schema does not have"


def out_of_range(key: str, kind):
    """A value of the field's type that its declared rule refuses."""
    ok = RANGES[key][0]
    kind = base(kind)
    candidates = {int: [-1, 0, 10**12], float: [-1.0, 0.0, 1.0, 1.5, 1e12], str: ["nope"]}.get(kind, [[0.5]])
    for value in candidates:
        try:
            if not ok(value):
                return value
        except (TypeError, AttributeError):
            continue
    pytest.fail(f"the range of {key} accepts every test value {candidates}: is it a range?")


@pytest.mark.parametrize("key", sorted(RANGES))
def test_an_out_of_range_value_is_refused_naming_it(make_cfg, key):
    cfg = make_cfg()
    value = out_of_range(key, LEAVES[key])
    OmegaConf.update(cfg, key, value, force_add=False)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert f"{key}={OmegaConf.select(cfg, key)} is out of range: it must be {describe(RANGES[key][1])}" in str(err.value)


@pytest.mark.parametrize("key", sorted(EVAL_SET_RANGES))
def test_eval_set_settings_are_ranged(make_cfg, key):
    cfg = make_cfg()
    cfg.data.eval_sets[0][key] = 0
    with pytest.raises(ConfigError, match=rf"data.eval_sets.0.{key}=0 is out of range"):
        validate(cfg)


def test_the_shipped_configs_are_in_range(make_cfg):
    validate(make_cfg())  # the default, and each algorithm
    for algo in ("grpo", "dapo", "reinforce_pp", "rpg_fkl"):
        validate(make_cfg(f"algo={algo}"))


def test_every_numeric_eval_set_setting_has_a_range():
    from rpg.config import EvalSetConfig

    numeric = {k for k, kind in leaf_fields(EvalSetConfig) if base(kind) in (int, float)}
    assert numeric == set(EVAL_SET_RANGES)
