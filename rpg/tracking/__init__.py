"""Run identity and tracking: the one tracking-URI rule and redaction (base), the MLflow store (store), the
tracker (tracker.MLflowTracker), what the MLflow UI shows (ui), the tracking server (server) and a run's
identity (identity: config hash, resume key, run name, git state, signals).

    python -m rpg.tracking upload PATH      # send an unsent-metrics file saved by a run
"""
