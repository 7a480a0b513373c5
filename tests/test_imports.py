"""What a CPU training process imports: the engines it does not use stay out (each costs seconds or 100 MB)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("mlflow", "sklearn", "scipy.stats", "pandas", "pyarrow", "submitit", "vllm")


def test_the_trainer_imports_no_engine_it_does_not_use():
    code = ("import sys, json; import rpg.train.loop, rpg.rollout.lean; from rpg.models import build_tiny_model; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_scikit_learn_stays_importable_after_the_trainer():
    code = "import rpg.train.loop, sklearn.metrics; print(sklearn.metrics.roc_curve.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "roc_curve"
