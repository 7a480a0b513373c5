"""Analysis of logged sweeps: MLflow -> tidy DataFrames -> the paper's tables and figures.

Entry point: ``python -m analysis --experiment <sweep> --out analysis/out/`` (see analysis/README.md).
"""

from analysis.load import Sweep, load_sweep

__all__ = ["Sweep", "load_sweep"]
