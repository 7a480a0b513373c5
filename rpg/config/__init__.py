"""Config schemas (one dataclass per group), registered in Hydra's ConfigStore, and validation.

YAML files under conf/ hold values only; these schemas define which keys exist and their types, so a
misspelt key fails at composition time.  ``validate(cfg)`` checks the combinations a schema cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

#: the Hydra config tree (conf/ at the project root)
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
REF_UPDATES = ("every_step", "every_k", "kl_threshold", "never")
#: losses whose KL term is algo.kl_estimator's (the others carry their divergence in the loss itself)
ESTIMATOR_LOSSES = ("ppo_clip", "dapo", "reinforce_pp", "reinforce_pp_baseline")


@dataclass
class AlgoConfig:
    """One algorithm: loss, advantage, KL, clipping, DAPO extras and the reference policy (conf/algo/)."""

    name: str = MISSING
    loss: str = MISSING  # key of rpg.core.losses.POLICY_LOSSES
    advantage: str = MISSING  # key of rpg.core.advantages.ADVANTAGES
    kl_coef: float = 0.0
    kl_estimator: Optional[str] = None  # ppo_clip only: k1 | k2 | k3 | null
    clip_low: Optional[float] = None
    clip_high: Optional[float] = None
    dual_clip_c: Optional[float] = None
    level: str = "token"  # token | sequence
    agg: str = "token-mean"
    max_log_ratio: float = 20.0
    ref_update: str = "every_step"  # every_step | every_k | kl_threshold | never
    ref_update_k: int = 10  # every_k: optimizer steps between reference refreshes
    ref_kl_threshold: float = 0.05  # kl_threshold: kappa on the moving average of token k3
    ref_kl_ema: float = 0.9  # kl_threshold: decay of that moving average
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    max_gen_batches: int = 8  # dynamic sampling gives up after this many generation rounds
    overlong_buffer_frac: float = 0.0  # DAPO overlong shaping: buffer as a fraction of data.max_response_len (0 = off)
    overlong_penalty: float = 1.0  # scale of that penalty


@dataclass
class ModelConfig:
    """The policy (conf/model/).  kind=tiny builds the embedded CPU model; kind=pretrained loads ``path``."""

    name: str = MISSING
    kind: str = "tiny"  # tiny | pretrained
    path: Optional[str] = None  # local directory of a transformers checkpoint (kind=pretrained)
    # tiny: architecture and supervised warm start on the toy task (rpg.models.warmstart.WarmStartConfig keys;
    # cached on disk by a hash of these values)
    warm_start: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in backward
    # pretrained: the architecture as published in the checkpoint's config.json (model_type, vocab_size,
    # hidden_size, ...). Read by the dry-run's memory estimate (rpg.launch.plan) and by benchmarks/bench_gpu.py to
    # build a random-initialised model of the real size; loading a checkpoint uses model.path's own config.
    arch: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSetConfig:
    name: str = MISSING
    path: str = MISSING
    k: int = 1  # samples per problem for mean@k / pass@k / maj@k
    max_problems: Optional[int] = None


@dataclass
class DataConfig:
    """Training prompts and held-out sets (conf/data/)."""

    name: str = MISSING
    kind: str = "parquet"  # parquet | toy (the synthetic task, written to the cache on first use)
    train_path: Optional[str] = None  # verl-schema parquet; the toy task writes its own
    reward: str = "math_dapo"  # key of rpg.rewards.REWARDS
    reward_timeout_s: float = 5.0
    max_prompt_len: int = 64
    max_response_len: int = 16
    chat_template: bool = False  # wrap prompts with the tokenizer's chat template
    toy_seed: int = 0  # toy task: seed of the problem split
    # beta for this task: every algorithm with a KL term takes it as algo.kl_coef (conf/algo/); the KL's
    # effect scales with the response length and reward scale, so a 5-token toy answer needs a larger one
    kl_coef: float = 1e-4
    eval_sets: list[EvalSetConfig] = field(default_factory=list)
    eval_greedy: bool = True  # also log eval/<set>/greedy_acc


@dataclass
class EngineConfig:
    """Where and how it runs (conf/engine/)."""

    name: str = MISSING
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16
    rollout: str = "hf"  # hf | lean (small models, CPU) | vllm
    backend: str = "local"  # local (one process) | fsdp (FSDP2, one process per GPU or per CPU rank)
    num_gpus: int = 0  # GPUs per node; 0 on CPU
    ranks_per_node: Optional[int] = None  # fsdp: training processes per node (None = num_gpus)
    nodes: int = 1  # nodes per run (fsdp)
    param_dtype: str = "float32"  # master weights, gradients and optimizer state; compute runs in ``dtype``
    gpu_memory_gib: float = 80.0  # memory of one GPU, for the dry-run's per-GPU estimate
    vllm_sleep: bool = True  # CUDA: free vLLM's weights and KV cache during the training phase
    logprob_chunk: int = 1024  # tokens per chunk when computing log-probs over the vocabulary
    torch_threads: Optional[int] = None
    vllm_gpu_memory_utilization: float = 0.5
    vllm_kv_cache_bytes: Optional[int] = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # the paper names none: AdamW's (torch, verl)
    warmup_steps: int = 0  # linear warm-up over this many RL steps (the paper's unit), then constant
    grad_clip: float = 1.0


@dataclass
class RolloutConfig:
    prompts_per_step: int = 16
    samples_per_prompt: int = 8  # G, the group size
    temperature: float = 1.0
    top_p: float = 1.0
    # engine.rollout=vllm: truncated importance sampling against sampler/trainer mismatch; each token's
    # loss is multiplied by min(pi_old / pi_sampler, tis_cap) (null = off; typical 2.0)
    tis_cap: Optional[float] = None
    # sample the next batch in a second process while the current one trains (one update behind; the
    # losses' pi_old is then the sampling policy, through its own log-probs). CPU, engine.rollout=lean, one rank.
    overlap: bool = False


@dataclass
class PPOConfig:
    """Optimisation over one rollout batch (the PPO-style inner loop)."""

    epochs: int = 1  # passes over each rollout batch
    mini_batch_size: int = 128  # responses per optimizer step
    micro_batch_size: int = 128  # responses per forward/backward (gradient accumulation); >= mini: one forward


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<launch directory>/mlflow.db
    experiment: str = "rpg"
    # log the exact full-vocabulary KL(pi_old || pi_ref) and KL(pi_ref || pi_old) per token beside the k1/k2/k3
    # estimates at the sampled tokens (kl_exact/*): two more no-grad forwards per RL step; one process
    exact_kl: bool = False


@dataclass
class RunConfig:
    algo: AlgoConfig = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    engine: EngineConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 1
    steps: int = 100
    eval_every: int = 10
    save_every: int = 1  # checkpoint every N steps (0 = only at the end and on preemption)
    resume: str = "auto"  # auto: continue from out_dir's last checkpoint if any | never
    out_dir: Optional[str] = None  # None: Hydra's run directory
    sweep: str = "rpg"  # sweep name: the MLflow experiment and output folder that group runs
    name: Optional[str] = None  # the run's name (MLflow, progress bar); None: <algo>-<model>-<data>-s<seed>
    cache_dir: Optional[str] = None  # warm starts and derived data; None: <project>/.cache
    dry_run: bool = False  # validate, print the size/memory/tokens estimate of rpg.launch.plan, and exit


def ranks_per_node(engine) -> int:
    """Training processes per node: engine.ranks_per_node, else one per GPU (fsdp); one for local."""
    if engine.backend != "fsdp":
        return 1
    return int(engine.ranks_per_node or engine.num_gpus or 1)


def tasks_per_node(backend: str, num_gpus: int, ranks: int | None = None) -> int:
    """SLURM tasks per node of one run (the launcher's resolver): ranks_per_node under FSDP, else one."""
    return ranks_per_node(SimpleNamespace(backend=backend, num_gpus=num_gpus, ranks_per_node=ranks))


if not OmegaConf.has_resolver("rpg.tasks_per_node"):  # used by conf/hydra/launcher/slurm.yaml
    OmegaConf.register_new_resolver("rpg.tasks_per_node", tasks_per_node)


def register_configs() -> None:
    """Store RunConfig as ``run_schema``, the first entry of conf/config.yaml's defaults.  Its typed fields
    (algo: AlgoConfig, ...) validate every group's YAML file, so no schema is stored inside a group, where
    it would be offered as a choice (``algo=algo_schema``) that composes to a config of MISSING values."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


class ConfigError(ValueError):
    """A configuration that composes but cannot run; the message says what to set."""


def validate(cfg) -> None:
    """Fail before any work on combinations the schemas cannot express."""
    from rpg.core.advantages import GROUP_ADVANTAGES

    from rpg.config.ranges import check_ranges, check_unknown_keys

    check_unknown_keys(cfg, RunConfig)
    check_ranges(cfg)
    a, r, u = cfg.algo, cfg.rollout, cfg.ppo
    try:
        loss_params(a)
    except ValueError as e:
        raise ConfigError(f"algo: {e}") from None
    batch = r.prompts_per_step * r.samples_per_prompt
    if batch % u.mini_batch_size:
        raise ConfigError(f"ppo.mini_batch_size={u.mini_batch_size} must divide the batch "
                          f"rollout.prompts_per_step x rollout.samples_per_prompt = {batch}")
    if u.micro_batch_size < u.mini_batch_size and u.mini_batch_size % u.micro_batch_size:
        raise ConfigError(f"ppo.micro_batch_size={u.micro_batch_size} must divide ppo.mini_batch_size={u.mini_batch_size} "
                          "(or be at least as large: one forward per mini-batch)")
    if a.advantage in GROUP_ADVANTAGES and r.samples_per_prompt < 2:
        raise ConfigError(f"algo.advantage={a.advantage} needs a group: set rollout.samples_per_prompt >= 2")
    if a.dynamic_sampling and r.samples_per_prompt < 2:
        raise ConfigError("algo.dynamic_sampling=true keeps groups of mixed accuracy, and a group of one response "
                          "never is: set rollout.samples_per_prompt >= 2 or algo.dynamic_sampling=false")
    if a.loss in ESTIMATOR_LOSSES and a.kl_coef > 0 and not a.kl_estimator:
        raise ConfigError(f"algo.loss={a.loss} with algo.kl_coef={a.kl_coef} needs algo.kl_estimator (k1, k2 or "
                          "k3) for its KL term; or set algo.kl_coef=0")
    if cfg.model.kind == "pretrained" and not cfg.model.path:
        raise ConfigError(f"model {cfg.model.name}: set model.path=/path/to/local/checkpoint "
                          "(a directory with config.json and weights; nothing is downloaded at run time)")
    e = cfg.engine
    if e.ranks_per_node is not None and (e.ranks_per_node < 1 or (e.num_gpus and e.ranks_per_node != e.num_gpus)):
        raise ConfigError(f"engine.ranks_per_node={e.ranks_per_node}: use one rank per GPU (engine.num_gpus="
                          f"{e.num_gpus}), or null")
    if r.overlap and (e.rollout != "lean" or e.backend != "local" or e.device != "cpu"):
        raise ConfigError(f"rollout.overlap=true samples in a second CPU process with the lean sampler: it needs "
                          f"engine.rollout=lean, engine.backend=local and engine.device=cpu (now {e.rollout}, "
                          f"{e.backend}, {e.device}); or set rollout.overlap=false")
    if cfg.tracking.exact_kl and (e.backend != "local" or a.ref_update == "every_step" or r.overlap):
        raise ConfigError("tracking.exact_kl=true compares the sampling policy with a reference model in one process: "
                          "it needs engine.backend=local, algo.ref_update other than every_step (whose anchor is "
                          f"pi_old: KL 0) and rollout.overlap=false (now {e.backend}, {a.ref_update}, {r.overlap}); "
                          "or set tracking.exact_kl=false")
    if r.tis_cap is not None:
        if e.rollout != "vllm" or r.tis_cap <= 0:
            raise ConfigError(f"rollout.tis_cap={r.tis_cap} corrects vLLM's sampling mismatch: use it with "
                              "engine.rollout=vllm and a cap > 0 (typical 2.0), or set rollout.tis_cap=null")
        if a.level != "token" or a.agg == "seq-mean":
            raise ConfigError("rollout.tis_cap weights tokens: it needs algo.level=token and a token aggregation")


def loss_params(algo):
    """The algo config's loss hyper-parameters (every LossParams field has an AlgoConfig field of its name)."""
    from rpg.core.losses import LossParams

    return LossParams(**{f.name: algo[f.name] for f in fields(LossParams)})
