"""The locally built char tokenizer and tiny Qwen2 model: round trips and save/load."""

import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from rpg.models.tiny import CHARS, build_char_tokenizer, build_tiny_model, load_tiny, save_tiny


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_special_ids_and_vocab(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == 3 + 95 + 1  # specials + printable ASCII + newline
    assert tok.padding_side == "left"


def test_spaces_and_newlines_round_trip(tok):
    text = "  47 + 85 =?\nAnswer:  132 \n\n~{}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character, nothing added
    assert tok.decode(ids) == text
    assert tok.decode(tok(CHARS)["input_ids"]) == CHARS


def test_unknown_chars_map_to_unk(tok):
    ids = tok("a\té€b", add_special_tokens=False)["input_ids"]
    assert ids[1:4] == [tok.unk_token_id] * 3
    assert tok.decode(ids) == "a<unk><unk><unk>b"


def test_decode_skips_specials_and_pads_left(tok):
    enc = tok(["1+2", "10+20"], padding=True, add_special_tokens=False)
    assert enc["input_ids"][0][:2] == [tok.pad_token_id] * 2
    assert enc["attention_mask"][0] == [0, 0, 1, 1, 1]
    ids = enc["input_ids"][0] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "1+2"


def test_chat_template_is_plain_content(tok):
    msgs = [{"role": "user", "content": "47+85=?\n"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == "47+85=?\n"


def test_save_load_round_trip(tmp_path, tok):
    model = build_tiny_model(seed=3, tokenizer=tok)
    save_tiny(model, tok, tmp_path)
    model2, tok2 = load_tiny(tmp_path)
    assert isinstance(tok2, PreTrainedTokenizerFast) and isinstance(model2, Qwen2ForCausalLM)
    text = "Answer: 1 2\n3"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.decode(tok2(text)["input_ids"]) == text
    assert tok2.get_vocab() == tok.get_vocab()
    assert tok2.padding_side == "left" and tok2.pad_token_id == 0 and tok2.eos_token_id == 1
    # the tokenizer alone also reloads through the class itself
    tok3 = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert tok3.decode(tok3(" a b ")["input_ids"]) == " a b "
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model2(ids).logits, model(ids).logits, atol=0.0, rtol=0.0)


def test_model_shape_and_seeded_init(tok):
    model = build_tiny_model(hidden=64, layers=2, heads=2, kv_heads=1, seed=0)
    cfg = model.config
    assert cfg.vocab_size == len(tok) and cfg.hidden_size // cfg.num_attention_heads == 32
    assert cfg.num_key_value_heads == 1 and cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 200_000
    same = build_tiny_model(kv_heads=1, seed=0)
    other = build_tiny_model(kv_heads=1, seed=1)
    w = model.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(same.model.layers[0].self_attn.q_proj.weight, w, atol=0.0, rtol=0.0)
    assert not torch.equal(other.model.layers[0].self_attn.q_proj.weight, w)


def test_small_head_dim_is_rejected():
    with pytest.raises(ValueError, match="head dim"):
        build_tiny_model(hidden=64, heads=4)


def test_generate_stops_at_eos_and_is_left_pad_safe(tok):
    model = build_tiny_model(seed=0, tokenizer=tok)
    prompts = ["12+7=?\n", "47+85=?\n"]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, do_sample=False, max_new_tokens=6)
    alone = model.generate(**tok(prompts[:1], return_tensors="pt"), do_sample=False, max_new_tokens=6)
    # the left-padded row continues exactly as the unpadded prompt does
    new = alone[0, 7:].tolist()
    assert len(new) >= 1
    assert out[0, enc["input_ids"].shape[1] :][: len(new)].tolist() == new


def test_char_encode_matches_the_tokenizer(tok):
    from rpg.models.tiny import char_encode

    texts = ["47+85=?\n", "12,13\nAnswer: 132", "a\té b", ""]
    assert char_encode(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]


def test_policy_is_built_without_dropout(make_cfg, tmp_path, tok):
    # a checkpoint trained with dropout: scored in eval mode (old log-probs) and trained in train mode, it
    # would give w != 1 at identical weights; build_policy turns dropout off in every mode
    from rpg.train.build import build_policy

    model = build_tiny_model(seed=0, tokenizer=tok)
    model.config.attention_dropout = 0.5
    save_tiny(model, tok, tmp_path / "ckpt")
    policy, _, _ = build_policy(make_cfg("model.kind=pretrained", f"model.path={tmp_path / 'ckpt'}"))
    assert policy.training and policy.config.attention_dropout == 0.0
    ids = torch.tensor([tok("Answer: 12")["input_ids"]] * 4)
    torch.manual_seed(0)
    with torch.no_grad():
        train_logits = policy(ids).logits
        eval_logits = policy.eval()(ids).logits
    torch.testing.assert_close(train_logits, eval_logits, atol=0.0, rtol=0.0)
