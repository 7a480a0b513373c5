"""Rollouts in a second process, one batch ahead of training (rollout.overlap=true).

``submit`` hands the next batch's prompts to a worker process that samples them with the lean sampler
(rpg/rollout/lean.py) from a copy of the policy's weights in shared memory, while the trainer updates; the
next ``generate`` with the same prompts returns that batch.  The copy is refreshed only when the worker is
idle, at ``submit``: it holds the weights of the last ``sync_weights`` before it.  With the loop's order
(collect batch t, submit batch t + 1, update on t, sync) every batch after the first is sampled by the policy
one update behind the one it trains: ``Generations.policy_lag`` says how many updates, and the sampler's own
log-probs (``sampler_logp``) are pi_old of the update, so the losses' importance weights are those of the
policy that actually sampled the tokens.  With a frozen reference (algo.ref_update=never) the worker also
scores a batch under it when that shortens the step (its sampling is faster than the trainer's update, as at
16 x 8 on the tiny model); otherwise the trainer does, as without overlap.
"""

from __future__ import annotations

import copy
import multiprocessing.connection
import time

import torch
import torch.multiprocessing as mp

from rpg.rollout.base import Generations, SamplingParams, copy_weights
from rpg.rollout.lean import LeanEngine, check_supported


def _serve(conn: multiprocessing.connection.Connection, model, tokenizer, threads: int | None, reference,
           score) -> None:
    """The worker: generate each (prompts, sampling, seed) request it receives (and score the responses
    under the frozen reference, if it has one); None stops it."""
    torch.set_num_threads(threads or 1)  # the trainer's process has the other core
    engine = LeanEngine(model, tokenizer)
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the trainer is gone
            return
        if request is None:
            return
        prompts, sampling, seed, score_reference = request
        try:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            gens = engine.generate(prompts, sampling)
            t1 = time.perf_counter()
            if score_reference:
                with torch.no_grad():
                    gens.ref_logp = score(reference, gens)
            conn.send((gens, t1 - t0, time.perf_counter() - t1))
        except Exception as exc:  # noqa: BLE001 - handed to the trainer, which raises it
            conn.send(RuntimeError(f"rollout worker failed: {type(exc).__name__}: {exc}"))


class BackgroundEngine:
    """A rollout engine whose sampling runs in a worker process, one request in flight at a time."""

    def __init__(self, model, tokenizer, threads: int | None = 1, reference=None, score=None):
        """``reference``: a frozen model whose log-probs of each batch, ``score(reference, gens)``, the worker
        computes after sampling (``Generations.ref_logp``), off the trainer's time."""
        check_supported(model)
        self.source = model
        self.version = 0  # sync_weights calls so far; the worker's copy holds the weights of `copied`
        self.copied = -1
        self.shared = copy.deepcopy(model).eval().share_memory()
        # the reference's copy is filled at the first submit, after a resume has loaded its weights
        self.reference = reference
        self.frozen = None if reference is None else copy.deepcopy(reference).eval().share_memory()
        self.tokenizer, self.threads, self.score = tokenizer, threads, score
        self.worker = None  # started by the first submit, inside the loop's try (so close() always runs)
        self.pending: tuple | None = None  # (prompts, sampling, version the worker samples with)
        # where the reference is scored: the worker's time (sampling + reference) against the trainer's
        # between a submit and the next receive decides, per request (the numbers are the same either way)
        self.timing = {"sample": 0.0, "reference": 0.0, "trainer": 0.0}
        self.score_in_worker = reference is not None
        self.submitted_at = 0.0

    def _start(self) -> None:
        # fork: the worker starts at once, with nothing to re-import (spawn would re-run the caller's script);
        # the weights it samples with are the shared-memory copy, so later copies into it reach the worker
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.worker = ctx.Process(target=_serve, args=(child, self.shared, self.tokenizer, self.threads, self.frozen,
                                                        self.score), daemon=True, name="rpg-rollout-worker")
        self.worker.start()
        child.close()

    def submit(self, prompts: list[list[int]], sampling: SamplingParams) -> None:
        """Start sampling ``prompts`` from the weights of the last sync; the next matching generate returns it."""
        if self.pending is not None:
            raise RuntimeError("a rollout request is already in flight: generate() it first")
        if self.worker is None:
            self._start()
        if self.copied != self.version:  # the worker is idle: refresh its copy
            copy_weights(self.shared, self.source)
            if self.copied < 0 and self.frozen is not None:
                copy_weights(self.frozen, self.reference)
            self.copied = self.version
        # each request's seed comes from the trainer's random stream, which its checkpoints keep
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.conn.send((prompts, sampling, seed, self.score_in_worker))
        self.pending = (prompts, sampling, self.copied)
        self.submitted_at = time.perf_counter()

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> Generations:
        if self.pending is None or self.pending[:2] != (prompt_token_ids, sampling):
            if self.pending is not None:
                self._receive()  # a different request: finish the one in flight, then sample this one
            self.submit(prompt_token_ids, sampling)
        version = self.pending[2]
        gens = self._receive()
        gens.policy_lag = self.version - version
        return gens

    def _receive(self) -> Generations:
        self.pending = None
        waiting = time.perf_counter()
        while not self.conn.poll(1.0):
            if not self.worker.is_alive():
                raise RuntimeError(f"the rollout worker process died (exit code {self.worker.exitcode})")
        out = self.conn.recv()
        if isinstance(out, Exception):
            raise out
        gens, sample_s, reference_s = out
        self._place_reference(waiting - self.submitted_at, sample_s, reference_s)
        return gens

    def _place_reference(self, trainer_s: float, sample_s: float, reference_s: float) -> None:
        """Score the reference in the worker or leave it to the trainer, whichever makes the slower side faster."""
        if self.frozen is None:
            return
        t = self.timing
        t["sample"], t["trainer"] = sample_s, trainer_s - (0.0 if self.score_in_worker else t["reference"])
        if self.score_in_worker:
            t["reference"] = reference_s
        in_worker = max(t["trainer"], t["sample"] + t["reference"])
        in_trainer = max(t["trainer"] + t["reference"], t["sample"])
        self.score_in_worker = in_worker <= in_trainer

    def sync_weights(self, model) -> None:
        """Sample from ``model``'s weights from the next submit on (copied then, while the worker is idle)."""
        self.source = model
        self.version += 1

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        if self.worker is None:
            return
        if self.worker.is_alive():
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.worker.join(5)
        if self.worker.is_alive():
            self.worker.kill()
        self.conn.close()
