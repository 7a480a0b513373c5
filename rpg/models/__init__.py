"""Locally built models and tokenizers (no downloads), and the dtypes a config names."""

import torch

from rpg.models.tiny import (
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
