"""A tiny Qwen2 causal LM and a character-level tokenizer, both built locally (no downloads).

The tokenizer maps every printable ASCII character and ``\\n`` to its own id; anything else becomes
``<unk>``. Special ids are fixed: ``<pad>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2. It is wrapped as a
``transformers.PreTrainedTokenizerFast`` and must be reloaded with that class, not ``AutoTokenizer``
(which would substitute Qwen2's byte-level pre-tokenizer for a ``qwen2`` config and lose spaces).
Its chat template concatenates the message contents, so ``apply_chat_template`` on a verl-style
``[{"role": "user", "content": ...}]`` prompt yields the raw prompt text.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
#: Printable ASCII (space to ``~``) plus newline; tabs and other whitespace map to ``<unk>``.
CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"
#: Joins the contents of all messages; no role markers (the tiny model has no chat format).
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: ids 0-2 are ``<pad>``, ``<eos>``, ``<unk>``, then one id per char.

    Padding is on the left (as generation needs); no special tokens are added when encoding.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character (newline included) is its own pre-token; the WordLevel model then looks it up.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )


def char_encode(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Same ids as ``tokenizer(texts, add_special_tokens=False)`` for the char tokenizer, ~30x faster.

    Only valid for the tokenizer of :func:`build_char_tokenizer` (one token per character).
    """
    vocab, unk = tokenizer.get_vocab(), tokenizer.unk_token_id
    return [[vocab.get(ch, unk) for ch in text] for text in texts]


def build_tiny_model(
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 128,
    tie_embeddings: bool = True,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Qwen2ForCausalLM:
    """A randomly initialised float32 ``Qwen2ForCausalLM`` sized for the char tokenizer.

    ``intermediate`` defaults to ``4 * hidden``. Initialisation is deterministic given ``seed``
    (the global torch RNG is left untouched).
    """
    if hidden % heads:
        raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be divisible by kv_heads={kv_heads}")
    if hidden // heads < 32:
        raise ValueError(
            f"head dim hidden/heads = {hidden // heads} < 32; the CPU vLLM build needs >= 32: "
            "lower `heads` or raise `hidden`"
        )
    tok = tokenizer if tokenizer is not None else build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate if intermediate is not None else 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        use_sliding_window=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    return model.eval()


def save_tiny(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Write model weights/config and the tokenizer into ``path`` (``save_pretrained`` layout)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Reload the char tokenizer saved by :func:`save_tiny` (left padding, offline)."""
    tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    tok.padding_side = "left"
    return tok


def load_tiny(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` saved by :func:`save_tiny`; the model is in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no saved model at {path} (expected {path / 'config.json'})")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model.eval(), load_tokenizer(path)
