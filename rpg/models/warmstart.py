"""Supervised warm start of the tiny model on the toy task, cached on disk.

RL from a random init gets no reward, so the CPU default first fine-tunes the tiny model for a few
seconds with teacher forcing (cross-entropy on the response tokens and ``<eos>`` only) on
demonstrations from a *careless* demonstrator: each carry of the column-sum scratchpad is
forgotten with probability ``careless`` (default 0.65). The model learns the digit facts and the
format but inherits the habit, so its greedy answer is wrong whenever a carry is needed (held-out
greedy accuracy about 25-35%) while sampling still produces the correct carry about a third of the
time. RL then has a clear, quickly learnable signal: always carry. ``careless=0`` with a small
``target_fit`` gives a plain, early-stopped warm start instead (RL then learns much more slowly).

Training stops once ``target_fit`` of the greedy answers on some *training* problems are responses
the demonstrator could have written. That early stop is a threshold on greedy answers, so last-bit
differences between CPU kernel sets (AVX2 vs AVX-512, MKL's code paths) move it and change the weights.
Hence:

* **The default warm start is shipped** (``rpg/models/warmstart_default/``, 0.6 MB of safetensors with
  its SHA-256 in ``warmstart.json``): every machine starts the default run from the same weights.
  ``python -m rpg.models.warmstart`` regenerates it under pinned kernels (ATen AVX2, MKL's AVX2 reproducibility
  mode, one thread), and ``python -m rpg.models.warmstart --check`` retrains and compares the checksum.
* **Any other setting is trained** on one thread (whatever the caller's thread count) and cached under
  ``cache_dir/<hash of all settings>-<torch version>-<kernel set>`` (written to a temp dir, then
  renamed), so a second call returns at once and no machine reuses another kernel set's result.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from rpg.models.tiny import build_char_tokenizer, build_tiny_model, char_encode, save_tiny
from rpg.data.toy_task import (
    DIGITS,
    N_TEST,
    MAX_RESPONSE_TOKENS,
    Problem,
    careless_response,
    demonstrations,
    format_prompt,
    is_correct,
    split_pairs,
    toy_problems,
)

#: Bump when the training procedure changes so old cache entries are not reused.
WARMSTART_VERSION = 2
META_FILE = "warmstart.json"
WEIGHTS_FILE = "model.safetensors"
#: The shipped default warm start (regenerate: ``python -m rpg.models.warmstart``).
SHIPPED_DIR = Path(__file__).resolve().parent / "warmstart_default"
#: Kernel pins under which the shipped weights are trained, so that neither ATen nor MKL follows the host CPU
#: (without them this machine stopped at 560 / 660 steps under its own / ATen-avx2 kernels; pinned: 520).
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2",
                  "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class WarmStartConfig:
    """All settings of the warm start. Every field except ``cache_dir`` enters the cache key."""

    seed: int = 0
    sft_steps: int = 1000  # upper bound; training normally stops earlier at ``target_fit``
    lr: float = 3e-3
    batch: int = 32
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # the demonstrator forgets each carry with this probability (0 = always correct)
    careless: float = 0.65
    # stop once this fraction of greedy answers on ``val_problems`` *training* problems are
    # responses the demonstrator could have written (checked every ``check_every`` steps);
    # ``target_fit <= 0`` trains all ``sft_steps``
    target_fit: float = 0.9
    check_every: int = 20
    val_problems: int = 128
    # model
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    kv_heads: int = 2
    intermediate: int = 256
    max_positions: int = 128
    # task (the held-out split is never trained on nor used for stopping)
    digits: int = DIGITS
    split_seed: int = 0
    n_test: int = N_TEST
    # greedy accuracy on this many held-out problems after training, for the record (0 skips it)
    eval_problems: int = 500
    cache_dir: str = ".cache/rpg/warmstart"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "WarmStartConfig":
        """Build from a dict-like config; unknown keys raise an error listing the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown warm-start settings {unknown}; valid: {sorted(names)}")
        return cls(**dict(values))

    def key(self) -> str:
        """Hash of every setting that changes the result (not ``cache_dir``)."""
        d = asdict(self)
        d.pop("cache_dir")
        d["version"] = WARMSTART_VERSION
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def warm_start(
    cfg: WarmStartConfig | Mapping[str, Any] | None = None, progress: bool = True, **overrides: Any
) -> Path:
    """Return the directory of the warm-started model + tokenizer, training it if not cached.

    ``cfg`` is a :class:`WarmStartConfig` or a mapping of its fields; ``overrides`` replace fields.
    Load the result with :func:`rpg.models.tiny.load_tiny`; ``warmstart.json`` in it holds the
    settings, the training time and the held-out greedy accuracy.
    """
    if cfg is None:
        cfg = WarmStartConfig()
    elif not isinstance(cfg, WarmStartConfig):
        cfg = WarmStartConfig.from_mapping(cfg)
    cfg = replace(cfg, **overrides) if overrides else cfg
    shipped = shipped_meta()
    if shipped is not None and shipped["key"] == cfg.key():
        verify_shipped()
        return SHIPPED_DIR
    out = Path(cfg.cache_dir) / f"{cfg.key()}-{kernel_tag()}"
    if (out / META_FILE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with one_thread():
            meta = _train(cfg, tmp, progress)
        meta["kernels"] = kernel_tag()
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        try:
            tmp.rename(out)
        except OSError:
            if not (out / META_FILE).is_file():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_meta(path: str | Path) -> dict:
    """The ``warmstart.json`` record of a warm-start directory."""
    return json.loads((Path(path) / META_FILE).read_text())


def kernel_tag() -> str:
    """What besides the settings decides a trained warm start: torch's version and CPU kernel set."""
    return f"torch{torch.__version__.split('+')[0]}-{torch.backends.cpu.get_cpu_capability().lower()}"


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shipped_meta() -> dict | None:
    """The record of the shipped default warm start, or None where it is not installed."""
    return load_meta(SHIPPED_DIR) if (SHIPPED_DIR / META_FILE).is_file() else None


def verify_shipped() -> None:
    """Refuse shipped weights whose checksum is not the recorded one."""
    want, got = shipped_meta()["sha256"], file_sha256(SHIPPED_DIR / WEIGHTS_FILE)
    if got != want:
        raise RuntimeError(f"{SHIPPED_DIR / WEIGHTS_FILE} has SHA-256 {got}, not the recorded {want}: restore it "
                           "(git checkout rpg/models/warmstart_default) or regenerate it (python -m rpg.models.warmstart)")


@contextlib.contextmanager
def one_thread():
    """Run on one torch thread (the thread count changes reduction order), then restore the caller's."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _encode_sft(tokenizer, prompts: list[list[int]], responses: list[str]):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the response)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses_ids = char_encode(tokenizer, responses)
    width = max(len(p) + len(r) + 1 for p, r in zip(prompts, responses_ids))
    ids, labels, mask = [], [], []
    for p, r in zip(prompts, responses_ids):
        fill = width - len(p) - len(r) - 1
        ids.append(p + r + [eos] + [pad] * fill)
        labels.append([-100] * len(p) + r + [eos] + [-100] * fill)
        mask.append([1] * (width - fill) + [0] * fill)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def demonstrator_fit(model, tokenizer, pairs: list[tuple[int, int]]) -> float:
    """Fraction of greedy responses to ``a+b`` that some (careless or not) demonstration matches."""
    outs = greedy_generate(model, tokenizer, [format_prompt(a, b) for a, b in pairs])
    return sum(o in demonstrations(a, b) for o, (a, b) in zip(outs, pairs)) / len(pairs)


def _train(cfg: WarmStartConfig, out: Path, progress: bool) -> dict:
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(
        hidden=cfg.hidden,
        layers=cfg.layers,
        heads=cfg.heads,
        kv_heads=cfg.kv_heads,
        intermediate=cfg.intermediate,
        max_positions=cfg.max_positions,
        seed=cfg.seed,
        tokenizer=tokenizer,
    )
    task = dict(seed=cfg.split_seed, digits=cfg.digits, n_test=cfg.n_test)
    train = split_pairs(**task)["train"]
    prompts = char_encode(tokenizer, [format_prompt(a, b) for a, b in train])
    rng = random.Random(f"warmstart-{cfg.seed}")
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    t0 = time.perf_counter()
    loss_val, fit, steps = float("nan"), None, 0
    bar = tqdm(range(cfg.sft_steps), desc="warm start (SFT)", disable=not progress, leave=False)
    for step in bar:
        model.train()
        for group in opt.param_groups:  # linear warmup, then constant
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        idx = torch.randint(len(train), (cfg.batch,), generator=gen).tolist()
        responses = [careless_response(*train[i], cfg.careless, rng) for i in idx]
        ids, mask, labels = _encode_sft(tokenizer, [prompts[i] for i in idx], responses)
        if ids.shape[1] > cfg.max_positions:
            raise ValueError(f"{ids.shape[1]}-token sequences exceed max_positions={cfg.max_positions}")
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss_val, steps = loss.item(), step + 1
        if cfg.target_fit > 0 and steps % cfg.check_every == 0:
            model.eval()
            fit = demonstrator_fit(model, tokenizer, train[: cfg.val_problems])
            bar.set_postfix(loss=f"{loss_val:.3f}", fit=f"{fit:.2f}")
            if fit >= cfg.target_fit:
                break
    train_s = time.perf_counter() - t0
    bar.close()
    model.eval()
    meta: dict[str, Any] = {
        "settings": {k: v for k, v in asdict(cfg).items() if k != "cache_dir"},
        "key": cfg.key(),
        "version": WARMSTART_VERSION,
        "steps": steps,
        "train_seconds": round(train_s, 3),
        "final_loss": loss_val,
        "train_demonstrator_fit": fit,
    }
    if cfg.target_fit > 0 and (fit is None or fit < cfg.target_fit):
        warnings.warn(
            f"warm start used all sft_steps={cfg.sft_steps} without reaching target_fit="
            f"{cfg.target_fit} (reached {fit}); raise sft_steps or lr",
            stacklevel=3,
        )
    if cfg.eval_problems > 0:
        test = toy_problems("test", **task)[: cfg.eval_problems]
        meta["heldout_greedy_acc"] = greedy_accuracy(model, tokenizer, test)
        meta["heldout_problems"] = len(test)
    save_tiny(model, tokenizer, out)
    return meta


@torch.no_grad()
def greedy_generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_RESPONSE_TOKENS, batch_size: int = 512
) -> list[str]:
    """Greedy completions (decoded, special tokens dropped) for left-padded ``prompts``."""
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,
                        padding_side="left", add_special_tokens=False)
        gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outs


def greedy_accuracy(
    model, tokenizer, problems: list[Problem], max_new_tokens: int = MAX_RESPONSE_TOKENS
) -> float:
    """Fraction of ``problems`` whose greedy response has the exact right ``Answer:``."""
    responses = greedy_generate(model, tokenizer, [p for p, _ in problems], max_new_tokens)
    return sum(is_correct(r, t) for r, (_, t) in zip(responses, problems)) / len(problems)


def _regenerate(check: bool) -> int:
    """Train the default warm start under PINNED_KERNELS; write it to SHIPPED_DIR, or compare (``check``)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = WarmStartConfig()
        with one_thread():
            meta = _train(cfg, Path(tmp), progress=True)
        meta.pop("train_seconds")  # the record is part of the shipped files: only what is reproducible
        meta.update(kernels=kernel_tag(), pinned=PINNED_KERNELS, sha256=file_sha256(Path(tmp) / WEIGHTS_FILE))
        if check:
            shipped = shipped_meta() or {}
            same = meta["sha256"] == shipped.get("sha256") and meta["key"] == shipped.get("key")
            print(f"retrained {meta['sha256']} ({meta['steps']} steps), shipped {shipped.get('sha256')}: "
                  f"{'identical' if same else 'DIFFERENT'}")
            return 0 if same else 1
        (Path(tmp) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(SHIPPED_DIR, ignore_errors=True)
        shutil.copytree(tmp, SHIPPED_DIR)
    print(f"wrote {SHIPPED_DIR} ({meta['steps']} steps, held-out greedy accuracy {meta['heldout_greedy_acc']}, "
          f"sha256 {meta['sha256']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rpg.models.warmstart", description=(
        "Regenerate the shipped default warm start under pinned CPU kernels (or --check it)."))
    parser.add_argument("--check", action="store_true", help="retrain and compare with the shipped checksum")
    args = parser.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in PINNED_KERNELS.items()):  # pins are read when torch loads
        env = {**os.environ, **PINNED_KERNELS}
        return subprocess.call([sys.executable, "-m", "rpg.models.warmstart", *(argv or sys.argv[1:])], env=env)
    return _regenerate(args.check)


if __name__ == "__main__":
    raise SystemExit(main())
