"""What the MLflow web UI (3.17) shows of the project's runs; scripts/check_mlflow_ui.sh checks it in a browser.

- The view. MLflow 3.17 opens an experiment in its GenAI view (traces) or its model-training view from the
  URL's ``workflowType`` parameter, else from the browser's last choice of the sidebar switch (default:
  GenAI). ``runs_url`` is the link that opens an experiment's runs in the training view. The experiment
  tag ``mlflow.experimentKind`` (what the UI's own kind selector writes) is set too, for the UIs that
  follow it; the 3.17 UI itself does not read it.
- The runs table. By default 3.17 shows no metric column (only Source, Models, Dataset). The experiment
  tag ``mlflow.sharedViewState.rpg`` is a shared view (JSON), opened by the link's
  ``viewStateShareKey=rpg``: Duration, User, Source and the headline metrics the runs log (the page then
  says it shows a shared view; "Exit shared view" returns to the browser's own columns).
- A run's description (``mlflow.note.content``) and source (``mlflow.source.*``, ``mlflow.user``): ``run_tags``.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import shlex
import sys
from urllib.parse import urlsplit

from rpg.tracking.base import redact

log = logging.getLogger("rpg.tracking.tracker")  # its filter (rpg.tracking.tracker) keeps passwords out of these lines too

KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
VIEW_KEY = "rpg"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
BASE_COLUMNS = ("attributes.`Duration`", "attributes.`User`", "attributes.`Source`")
HEADLINE = re.compile(r"train/acc|train/score_mean|kl/k3|eval/[^/]+/(greedy_acc|mean_at_\d+)")
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves a database store by default
NOTE_LIMIT = 8000  # MLflow's longest tag value


def runs_url(tracking_uri: str, experiment_id: str) -> str:
    """The link to ``experiment_id``'s runs in the model-training view with the project's columns: on the
    tracking server (without its credentials), or on `mlflow ui`'s default address for a database store."""
    base = UI_ADDRESS
    if tracking_uri.startswith(("http://", "https://")):
        parts = urlsplit(tracking_uri)
        base = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path.rstrip('/')}"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def view_state(current: str | None, metric_keys) -> str | None:
    """The shared view's JSON with the headline metrics among ``metric_keys`` added as columns (the
    columns it has are kept); None when ``current`` already shows them all."""
    try:
        state = json.loads(current) if current else {}
    except ValueError:
        state = {}
    state = state if isinstance(state, dict) else {}
    columns = list(state.get("selectedColumns") or BASE_COLUMNS)
    new = [c for c in (f"metrics.`{k}`" for k in sorted(set(metric_keys)) if HEADLINE.fullmatch(k))
           if c not in columns]
    if "selectedColumns" in state and not new:
        return None
    return json.dumps({**state, "selectedColumns": columns + new})


def prepare_experiment(client, experiment_id: str) -> None:
    """Give the experiment the model-training kind and the runs view where it has none (experiments made
    by older versions included). Best effort: a store that refuses experiment tags does not stop a run."""
    try:
        tags = client.get_experiment(experiment_id).tags
        if KIND_TAG not in tags:
            client.set_experiment_tag(experiment_id, KIND_TAG, TRAINING_KIND)
        state = view_state(tags.get(VIEW_TAG), ())
        if state is not None:
            client.set_experiment_tag(experiment_id, VIEW_TAG, state)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not tag experiment %s for the MLflow UI: %s", experiment_id, str(exc)[:200])


class RunsView:
    """Adds the headline metrics a run sends to its experiment's view: one try per metric name (from the
    tracker's sender, after a batch was accepted), never raising. Two runs adding different names at the
    same moment can lose one; the next run that sends it adds it again."""

    def __init__(self, client, experiment_id: str):
        self.client, self.experiment_id, self.seen = client, experiment_id, set()

    def add(self, keys) -> None:
        fresh = {k for k in keys if k not in self.seen and HEADLINE.fullmatch(k)}
        if not fresh:
            return
        self.seen |= fresh
        try:
            state = view_state(self.client.get_experiment(self.experiment_id).tags.get(VIEW_TAG), fresh)
            if state is not None:
                self.client.set_experiment_tag(self.experiment_id, VIEW_TAG, state)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not add columns %s to the MLflow view of experiment %s: %s", sorted(fresh),
                        self.experiment_id, str(exc)[:200])


def _entry(argv: list[str]) -> str:
    """The project module this process was started as (``python -m rpg.main``), else the training loop."""
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    return module if module.split(".")[0] == "rpg" else "rpg.train.loop"


def _varies(cfg) -> str | None:
    """What sets this run apart: its name when a sweep or multirun set it to the settings it varies, else the
    overrides of its command (Hydra's override_dirname: where it is stored excluded)."""
    if cfg.get("name"):
        return cfg.name
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():  # e.g. an FSDP rank, started from a config file
        return None
    return HydraConfig.get().job.override_dirname or "nothing: the defaults"


def run_tags(cfg, git_sha: str, git_dirty: bool) -> dict[str, str]:
    """The run's source (``mlflow.source.name/type``, ``mlflow.user``, ``mlflow.source.git.commit``) and
    description (``mlflow.note.content``: what ran, what varies, the command line), no password in any."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        user = os.environ.get("USER", "unknown")
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    varies = _varies(cfg)
    lines = [f"{cfg.algo.name} on {cfg.model.name} / {cfg.data.name}, seed {cfg.seed}, {cfg.steps} RL steps "
             f"(sweep {cfg.sweep})", ""]
    lines += [f"- varies: `{varies}`"] if varies else []
    lines += [f"- command: `{shlex.join(argv)[:NOTE_LIMIT // 2]}`",
              f"- code: git {git_sha}" + (" with uncommitted changes" if git_dirty else "")]
    lines += [f"- SLURM job {job}"] if job else []
    lines += ["- everything else: the run's parameters (the resolved config) and its artifact config.yaml"]
    tags = {"mlflow.note.content": redact("\n".join(lines))[:NOTE_LIMIT], "mlflow.source.name": _entry(argv),
            "mlflow.source.type": "JOB" if job else "LOCAL", "mlflow.user": user}
    if git_sha != "unknown":
        tags["mlflow.source.git.commit"] = git_sha
    return tags
