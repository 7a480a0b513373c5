"""Builders that turn a validated config into the objects of a run: policy, data, rollout engine, optimizer."""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rpg.config import ConfigError
from rpg.data import PROJECT_ROOT, PromptSet, load_prompt_set, prompt_set_from_records
from rpg.models import DTYPES
from rpg.rollout import make_engine
from rpg.rollout.sharded import ShardedEngine



def cache_dir(cfg) -> Path:
    return Path(cfg.cache_dir or os.environ.get("RPG_CACHE_DIR") or PROJECT_ROOT / ".cache")


def build_policy(cfg):
    """(model, tokenizer, info): the tiny model warm-started on the toy task, or a local checkpoint."""
    m = cfg.model
    # FSDP keeps master weights in param_dtype and computes in dtype; one process trains in dtype
    dtype = DTYPES[cfg.engine.param_dtype if cfg.engine.backend == "fsdp" else cfg.engine.dtype]
    if m.kind == "tiny":
        from rpg.models.tiny import load_tiny
        from rpg.models.warmstart import load_meta, warm_start

        settings = OmegaConf.to_container(m.warm_start, resolve=True)
        path = warm_start(settings, cache_dir=str(cache_dir(cfg) / "warmstart"), progress=True)
        model, tokenizer = load_tiny(path, dtype=dtype)
        info = {"warm_start_path": str(path), "warm_start_acc": load_meta(path).get("heldout_greedy_acc")}
    elif m.kind == "pretrained":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(m.path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path={m.path} holds no config.json: point model.path at a local "
                                    "transformers checkpoint directory (nothing is downloaded at run time)")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        info = {"model_path": str(path)}
    else:
        raise ValueError(f"model.kind={m.kind!r}; use tiny or pretrained")
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # FSDP2-safe
    model.to(cfg.engine.device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    without_dropout(model)
    return model.train(), tokenizer, info


def check_toy_split(cfg) -> None:
    """The tiny model's warm start and the toy task's RL data must split the problems the same way, or the
    held-out problems RL is evaluated on can be ones the warm start was trained on."""
    if cfg.model.kind != "tiny" or cfg.data.kind != "toy":
        return
    from rpg.data.toy_task import DIGITS, N_TEST
    from rpg.models.warmstart import WarmStartConfig

    ws = WarmStartConfig.from_mapping(cfg.model.warm_start)
    toy = {"split_seed": cfg.data.toy_seed, "digits": DIGITS, "n_test": N_TEST}  # the RL data's split (rpg.train.build)
    for key, value in toy.items():
        if getattr(ws, key) != value:
            fix = (f"set model.warm_start.split_seed={value} (or data.toy_seed={ws.split_seed})" if key == "split_seed"
                   else f"keep model.warm_start.{key}={value}, the toy data's")
            raise ConfigError(f"model.warm_start.{key}={getattr(ws, key)} splits the toy problems differently from "
                              f"the RL data (data.toy_seed={cfg.data.toy_seed}, {toy['digits']} digits, "
                              f"{toy['n_test']} held out): held-out problems could be warm-start training "
                              f"problems; {fix}")


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Turn every dropout off, in every mode: old log-probs are scored in eval mode and the update runs in
    train mode, so with dropout w = pi_theta/pi_old would differ from 1 at identical weights (verl also
    sets dropout to 0).  Covers nn.Dropout modules, float ``*dropout`` attributes of modules and the config."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):  # attention_dropout, dropout, ... used by F.dropout
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for key in [k for k in vars(config) if "dropout" in k] if config is not None else []:
        if isinstance(getattr(config, key), float):
            setattr(config, key, 0.0)
    return model


@dataclass
class EvalSet:
    name: str
    prompts: PromptSet  # one row per problem
    k: int


def build_data(cfg) -> tuple[PromptSet, list[EvalSet]]:
    """The training prompts and the held-out sets (deduplicated to one row per problem)."""
    from rpg.data import dedupe_problems

    d = cfg.data

    def toy(split: str, name: str) -> PromptSet:  # built in memory, the same rows as its parquet export
        from rpg.data.toy_task import toy_records

        return prompt_set_from_records(toy_records(split, seed=d.toy_seed), name)

    if d.train_path:
        train = load_prompt_set(d.train_path, name=d.name)
    elif d.kind == "toy":
        train = toy("train", d.name)
    else:
        raise ValueError(f"data {d.name}: set data.train_path=/path/to/train.parquet (verl schema)")
    evals = []
    for e in d.eval_sets:
        if e.path.startswith("toy:") and d.kind != "toy":
            raise ValueError(f"eval set {e.name}: path {e.path!r} needs data.kind=toy")
        if e.path.startswith("toy:"):
            loaded = toy(e.path.removeprefix("toy:"), e.name)
        else:
            loaded = load_prompt_set(e.path, name=e.name)
        problems = dedupe_problems(loaded)
        if e.max_problems:
            problems = problems.select(range(min(e.max_problems, len(problems))))
        evals.append(EvalSet(e.name, problems, e.k))
    return train, evals


def build_optimizer(cfg, model):
    o = cfg.optim
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr,
                                  betas=tuple(o.betas), weight_decay=o.weight_decay)
    warmup = max(o.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)) if warmup else 1.0)
    return optimizer, scheduler


def prompt_texts(prompts: PromptSet, tokenizer, chat_template: bool) -> list[str]:
    """What the model is conditioned on: the chat template applied, or the last user message as is."""
    if chat_template:
        return [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts.messages]
    return [m[-1]["content"] for m in prompts.messages]


def encode_prompts(texts: list[str], tokenizer, max_len: int) -> tuple[list[list[int]], int]:
    """Token ids, left-truncated to ``max_len``; also returns how many prompts were truncated."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    truncated = sum(len(x) > max_len for x in ids)
    return [x[-max_len:] for x in ids], truncated


def engine_options(cfg) -> dict:
    """The engine-specific keyword arguments of make_engine (vLLM: dtype, memory, seed, process, sleep)."""
    e = cfg.engine
    if e.rollout != "vllm":
        return {}
    options = {"dtype": e.dtype, "gpu_memory_utilization": e.vllm_gpu_memory_utilization,
               "kv_cache_memory_bytes": e.vllm_kv_cache_bytes, "seed": cfg.seed}
    if e.backend == "fsdp":  # the engine gets its own process, outside the trainer's process group
        options["in_process"] = False
    if e.device.startswith("cuda"):
        options["enable_sleep_mode"] = e.vllm_sleep
    return options


def build_engine(cfg, model, tokenizer, backend):
    """This rank's rollout engine: every rank samples its share of the prompts with its own engine; HF
    generate needs a full copy of the model under FSDP.  rollout.overlap: the training batches' engine runs
    in a process of its own (rpg.rollout.background), built by :func:`build_train_engine`."""
    sampler_model = model if backend.world_size == 1 or cfg.engine.rollout == "vllm" else copy.deepcopy(model)
    engine = make_engine(cfg.engine.rollout, sampler_model, tokenizer, **engine_options(cfg))
    return ShardedEngine(engine, backend) if backend.world_size > 1 else engine


def build_train_engine(cfg, model, tokenizer, engine, ref_model, backend):
    """The engine of the training batches: ``engine`` itself, or with rollout.overlap a background one (which
    also scores the batches under a frozen reference, algo.ref_update=never)."""
    if not cfg.rollout.overlap:
        return engine
    from rpg.rollout.background import BackgroundEngine

    frozen = ref_model if cfg.algo.ref_update == "never" else None
    return BackgroundEngine(model, tokenizer, threads=cfg.engine.torch_threads, reference=frozen,
                            score=functools.partial(score_reference, cfg=cfg, backend=backend))


def score_reference(reference, gens, cfg, backend):
    """The reference's log-probs of a batch's responses, as the learner scores them (micro-batched)."""
    from rpg.train.learner import score_logprobs

    return score_logprobs(reference, gens, cfg, backend)[0]
