"""Locally built models and tokenizers (no downloads), and the dtypes a config names."""

import sys

import torch


def _import_generation_without_sklearn() -> None:
    """Import transformers' generation code without scikit-learn.

    When scikit-learn is installed (mlflow requires it), transformers' candidate_generator imports
    sklearn.metrics for assisted decoding, which rpg never uses; that pulls in scikit-learn, scipy and pandas:
    0.8 s and ~100 MB in every training process (measured on the CPU default).  Only that module is told
    scikit-learn is absent (it keeps that answer: assisted decoding's confidence threshold is unavailable in
    the process); everything else, ``import sklearn`` included, sees it as usual.
    """
    import transformers.utils as utils

    if "transformers.generation.candidate_generator" in sys.modules or not hasattr(utils, "is_sklearn_available"):
        return
    available = utils.is_sklearn_available
    utils.is_sklearn_available = lambda: False
    try:
        import transformers.generation.candidate_generator  # noqa: F401
    finally:
        utils.is_sklearn_available = available


_import_generation_without_sklearn()

from rpg.models.tiny import (  # noqa: E402
    build_char_tokenizer,
    build_tiny_model,
    char_encode,
    load_tiny,
    load_tokenizer,
    save_tiny,
)

#: engine.dtype / engine.param_dtype -> torch dtype
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = [
    "DTYPES",
    "build_char_tokenizer",
    "build_tiny_model",
    "char_encode",
    "load_tiny",
    "load_tokenizer",
    "save_tiny",
]
