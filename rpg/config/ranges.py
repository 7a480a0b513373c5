"""The declared valid range of every numeric and enumerated setting, and the refusal of unknown keys.

Both run before any work (no run folder, no MLflow run) and name the key, the value and what to set.
``tests/test_config_ranges.py`` walks the schemas: every numeric or enumerated field must be listed here,
and an out-of-range value of each must be refused.
"""

from __future__ import annotations

import typing
from dataclasses import fields

from omegaconf import OmegaConf

from rpg.config import REF_UPDATES, ConfigError


def _core():
    import rpg.core.types as types  # torch: imported only when a run is checked

    return types


def _one_of(*choices):
    return (lambda v: v in choices, f"one of {', '.join(map(str, choices))}")


def _registered(registry_name: str):
    def names():
        if registry_name == "losses":
            from rpg.core.losses import POLICY_LOSSES as reg
        elif registry_name == "advantages":
            from rpg.core.advantages import ADVANTAGES as reg
        else:
            from rpg.rewards import REWARDS as reg
        return sorted(reg)

    return (lambda v: v in names(), lambda: "one of " + ", ".join(names()))


_POSITIVE, _NON_NEGATIVE, _AT_LEAST_1 = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1, ">= 1")
_DTYPE = _one_of("float32", "bfloat16", "float16")

#: key -> (test, what the valid range is, or a function saying it).  A null optional setting is not checked.
RANGES = {
    "data.kl_coef": (lambda v: v >= 0, ">= 0 (beta; 0 turns the KL term off)"),  # before algo.kl_coef, its copy
    "algo.loss": _registered("losses"),
    "algo.advantage": _registered("advantages"),
    "algo.kl_coef": (lambda v: v >= 0, ">= 0 (beta; 0 turns the KL term off)"),
    "algo.kl_estimator": _one_of("k1", "k2", "k3"),
    "algo.clip_low": (lambda v: 0 <= v < 1, "in [0, 1) (eps_low; null: no clip)"),
    "algo.clip_high": (lambda v: v >= 0, ">= 0 (eps_high; null: no clip)"),
    "algo.dual_clip_c": (lambda v: v > 1, "> 1 (e.g. 10; null: no dual clip)"),
    "algo.level": (lambda v: v in _core().LEVELS, "token or sequence"),
    "algo.agg": (lambda v: v in _core().TOKEN_AGGS + _core().SEQUENCE_AGGS,
                 "token-mean, seq-mean-token-mean, seq-mean-token-sum or seq-mean"),
    "algo.max_log_ratio": _POSITIVE,
    "algo.ref_update": _one_of(*REF_UPDATES),
    "algo.ref_update_k": (lambda v: v >= 1, ">= 1 (optimizer steps)"),
    "algo.ref_kl_threshold": _POSITIVE,
    "algo.ref_kl_ema": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "algo.max_gen_batches": _AT_LEAST_1,
    "algo.overlong_buffer_frac": (lambda v: 0 <= v < 1, "in [0, 1) (0: no overlong shaping)"),
    "algo.overlong_penalty": _NON_NEGATIVE,
    "model.kind": _one_of("tiny", "pretrained"),
    "data.kind": _one_of("parquet", "toy"),
    "data.reward": _registered("rewards"),
    "data.reward_timeout_s": (lambda v: v > 0, "> 0 (seconds per graded response)"),
    "data.max_prompt_len": (lambda v: v >= 1, ">= 1 (tokens)"),
    "data.max_response_len": (lambda v: v >= 1, ">= 1 (tokens)"),
    "data.toy_seed": _NON_NEGATIVE,
    "engine.device": (lambda v: v == "cpu" or v.startswith("cuda"), "cpu or cuda (cuda:N)"),
    "engine.dtype": _DTYPE,
    "engine.param_dtype": _DTYPE,
    "engine.rollout": (lambda v: v in ("hf", "lean", "vllm"), "hf, lean or vllm"),
    "engine.backend": (lambda v: v in ("local", "fsdp"), "local (one process) or fsdp (torchrun / SLURM tasks)"),
    "engine.num_gpus": (lambda v: v >= 0, ">= 0 (GPUs per node; 0 on CPU)"),
    "engine.ranks_per_node": _AT_LEAST_1,
    "engine.nodes": _AT_LEAST_1,
    "engine.gpu_memory_gib": _POSITIVE,
    "engine.logprob_chunk": (lambda v: v >= 1, ">= 1 (tokens per chunk)"),
    "engine.torch_threads": _AT_LEAST_1,
    "engine.vllm_gpu_memory_utilization": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "engine.vllm_kv_cache_bytes": _POSITIVE,
    "optim.lr": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two values in [0, 1), e.g. [0.9,0.999]"),
    "optim.warmup_steps": (lambda v: v >= 0, ">= 0 (RL steps)"),
    "optim.grad_clip": (lambda v: v > 0, "> 0 (the max gradient norm; a huge value turns clipping off)"),
    "rollout.prompts_per_step": _AT_LEAST_1,
    "rollout.samples_per_prompt": (lambda v: v >= 1, ">= 1 (the group size G)"),
    "rollout.temperature": (lambda v: v > 0, "> 0 (sampling at temperature 0 has no log-probability to train on)"),
    "rollout.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "rollout.tis_cap": (lambda v: v > 0, "> 0 (typical 2.0; null: off)"),
    "ppo.epochs": _AT_LEAST_1,
    "ppo.mini_batch_size": (lambda v: v >= 1, ">= 1 (responses per optimizer step)"),
    "ppo.micro_batch_size": (lambda v: v >= 1, ">= 1 (responses per forward)"),
    "seed": _NON_NEGATIVE,
    "steps": _NON_NEGATIVE,
    "eval_every": (lambda v: v >= 0, ">= 0 (0: no evaluation)"),
    "save_every": (lambda v: v >= 0, ">= 0 (0: only at the end)"),
    "resume": _one_of("auto", "never"),
}
#: per element of data.eval_sets
EVAL_SET_RANGES = {
    "k": (lambda v: v >= 1, ">= 1 (samples per problem)"),
    "max_problems": _AT_LEAST_1,
}


def check_ranges(cfg) -> None:
    """Refuse a value outside its declared range, naming the key, the value and the range."""
    items = [(key, OmegaConf.select(cfg, key), rule) for key, rule in RANGES.items()]
    items += [(f"data.eval_sets.{i}.{key}", e.get(key), rule)
              for i, e in enumerate(cfg.data.eval_sets) for key, rule in EVAL_SET_RANGES.items()]
    for key, value, (ok, valid) in items:
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value} is out of range: it must be {describe(valid)}")


def describe(valid) -> str:
    return valid() if callable(valid) else valid


def check_unknown_keys(node, schema, where: str = "") -> None:
    """Refuse a key no schema declares, in every group and at the top (a ``+key=value`` typo included)."""
    valid = {f.name for f in fields(schema)}
    unknown = sorted(set(node) - valid)
    if unknown:
        group = where.rstrip(".") or "the run config"
        raise ConfigError(f"{group} has unknown keys {[where + k for k in unknown]}; valid keys: {sorted(valid)} "
                          "(a misspelt key, or a '+' that added one)")
    for name, kind in typing.get_type_hints(schema).items():
        value = node.get(name)
        if value is None:
            continue
        if hasattr(kind, "__dataclass_fields__"):
            check_unknown_keys(value, kind, f"{where}{name}.")
        elif typing.get_origin(kind) is list and hasattr(typing.get_args(kind)[0], "__dataclass_fields__"):
            for i, item in enumerate(value):
                check_unknown_keys(item, typing.get_args(kind)[0], f"{where}{name}.{i}.")
