"""Locally built models and tokenizers (no downloads)."""

from rpg.models.tiny import (
    build_char_tokenizer,
    build_tiny_model,
    char_encode,
    load_tiny,
    load_tokenizer,
    save_tiny,
)

__all__ = [
    "build_char_tokenizer",
    "build_tiny_model",
    "char_encode",
    "load_tiny",
    "load_tokenizer",
    "save_tiny",
]
