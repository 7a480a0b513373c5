"""The synthetic addition task (splits, formats, parquet) and the cached supervised warm start."""

import json
import random
import time

import pandas as pd
import pytest

from rpg.models.tiny import load_tiny
from rpg.data.toy_task import (
    MAX_RESPONSE_TOKENS,
    careless_response,
    carry_points,
    column_sums,
    demonstrations,
    extract_answer,
    format_response,
    is_correct,
    split_pairs,
    toy_problems,
    toy_sft_pairs,
    toy_records,
    write_parquet,
)
from rpg.models.warmstart import WarmStartConfig, greedy_accuracy, kernel_tag, load_meta, warm_start


def test_splits_are_disjoint_even_up_to_commutativity():
    s = split_pairs(seed=0)
    train, test = set(s["train"]), set(s["test"])
    assert len(test) == len(s["test"]) == 500 and len(train) == len(s["train"])
    assert not train & test
    assert not {(b, a) for a, b in train} & test
    # every 2-digit pair is used once, except the dropped order of at most one test pair
    assert 90 * 90 - 1 <= len(train) + len(test) <= 90 * 90
    assert all(10 <= a <= 99 and 10 <= b <= 99 for a, b in train | test)


def test_splits_are_deterministic_and_seeded():
    assert toy_problems("test", seed=0) == toy_problems("test", seed=0)
    assert toy_problems("train", seed=0) == toy_problems("train", seed=0)
    assert set(toy_problems("test", seed=0)) != set(toy_problems("test", seed=1))
    assert len(toy_problems("test", n_test=37)) == 37


def test_bad_arguments_say_what_to_set():
    with pytest.raises(ValueError, match="set split"):
        toy_problems("val")
    with pytest.raises(ValueError, match="digits"):
        toy_problems("test", digits=5)


def test_formats_and_grading():
    assert column_sums(47, 85) == [12, 13]
    assert column_sums(10, 10) == [0, 2]
    assert format_response(47, 85) == "12,13\nAnswer: 132"
    prompt, truth = toy_problems("train")[0]
    sft_prompt, response = toy_sft_pairs("train")[0]
    assert sft_prompt == prompt and prompt.endswith("=?\n") and extract_answer(response) == truth
    a, b = (int(x) for x in prompt[:-3].split("+"))
    assert int(truth) == a + b
    assert max(len(r) for _, r in toy_sft_pairs("train")) + 1 == MAX_RESPONSE_TOKENS  # + <eos>
    assert is_correct("9,14\nAnswer: 149", "149")
    assert is_correct("answer:149\nAnswer : 150 ", "150")  # last match wins, stripped
    assert not is_correct("Answer: 149x", "149")
    assert not is_correct("Answer: 14", "149")
    assert not is_correct("149", "149")


def test_careless_demonstrations():
    assert carry_points(47, 85) == [1, 2] and carry_points(12, 34) == []
    assert format_response(47, 85, forget=[1]) == "12,12\nAnswer: 122"
    assert format_response(47, 85, forget=[2]) == "12,13\nAnswer: 32"
    assert format_response(47, 85, forget=[1, 2]) == "12,12\nAnswer: 22"
    assert demonstrations(12, 34) == {"6,4\nAnswer: 46"}
    assert len(demonstrations(47, 85)) == 4 and format_response(47, 85) in demonstrations(47, 85)
    rng = random.Random(0)
    draws = [careless_response(47, 85, 0.65, rng) for _ in range(4000)]
    assert set(draws) == demonstrations(47, 85)
    # each carry is kept with prob 0.35, so the correct response has prob 0.35**2 = 0.1225
    assert draws.count(format_response(47, 85)) / 4000 == pytest.approx(0.1225, abs=0.02)
    assert {careless_response(47, 85, 0.0, rng) for _ in range(50)} == {format_response(47, 85)}
    assert not any(is_correct(d, "132") for d in demonstrations(47, 85) - {format_response(47, 85)})


def test_parquet_has_the_verl_schema(tmp_path):
    path = write_parquet(tmp_path / "toy" / "test.parquet", "test", n_test=20)
    df = pd.read_parquet(path)
    assert list(df.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert len(df) == 20 and set(df["data_source"]) == {"toy"}
    row = df.iloc[3]
    prompt, truth = toy_problems("test", n_test=20)[3]
    assert list(row["prompt"]) == [{"role": "user", "content": prompt}]
    assert row["reward_model"] == {"ground_truth": truth, "style": "rule"}
    assert row["extra_info"] == {"index": 3, "raw_problem": prompt.strip(), "split": "test"}


def test_the_in_memory_toy_set_is_its_parquet_export(tmp_path):
    """Runs build the toy prompts from toy_records directly (no parquet): the same PromptSet as reading the
    exported file back."""
    from rpg.data import load_prompt_set, prompt_set_from_records

    for split in ("train", "test"):
        path = write_parquet(tmp_path / f"{split}.parquet", split)
        assert prompt_set_from_records(toy_records(split), "toy") == load_prompt_set(path, name="toy")


TINY_SFT = dict(sft_steps=4, batch=8, warmup_steps=1, target_fit=0.0, eval_problems=16, n_test=50)


def test_warm_start_is_cached_by_settings(tmp_path):
    cfg = WarmStartConfig(cache_dir=str(tmp_path), **TINY_SFT)
    path = warm_start(cfg, progress=False)
    meta = load_meta(path)
    assert path.parent == tmp_path and path.name == f"{cfg.key()}-{kernel_tag()}" and meta["key"] == cfg.key()
    assert meta["kernels"] == kernel_tag()
    assert meta["steps"] == 4 and meta["heldout_problems"] == 16
    model, tokenizer = load_tiny(path)  # the record is the saved weights' greedy accuracy on the held-out split
    held_out = toy_problems("test", seed=0, n_test=50)[:16]
    assert meta["heldout_greedy_acc"] == greedy_accuracy(model, tokenizer, held_out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir renamed away

    t = time.perf_counter()
    again = warm_start(dict(cache_dir=str(tmp_path), **TINY_SFT), progress=False)
    assert again == path and time.perf_counter() - t < 0.5
    assert json.loads((again / "warmstart.json").read_text()) == meta

    other = warm_start(cfg, progress=False, seed=1)
    assert other != path and other.parent == tmp_path
    model, tok = load_tiny(path)
    acc = greedy_accuracy(model, tok, toy_problems("test", n_test=50)[:16])
    assert acc == pytest.approx(meta["heldout_greedy_acc"], abs=1e-12)


def test_warm_start_warns_when_target_fit_not_reached(tmp_path):
    cfg = WarmStartConfig(cache_dir=str(tmp_path), **{**TINY_SFT, "target_fit": 1.0})
    with pytest.warns(UserWarning, match="raise sft_steps"):
        path = warm_start(cfg, progress=False, check_every=2, val_problems=4, eval_problems=0)
    meta = load_meta(path)
    assert meta["steps"] == 4 and meta["train_demonstrator_fit"] < 1.0
    assert "heldout_greedy_acc" not in meta


def test_warm_start_key_ignores_cache_dir_only():
    base = WarmStartConfig()
    assert WarmStartConfig(cache_dir="/elsewhere").key() == base.key()
    assert WarmStartConfig(lr=1e-3).key() != base.key()
    with pytest.raises(ValueError, match="unknown warm-start settings"):
        WarmStartConfig.from_mapping({"learning_rate": 1e-3})


def _write_many(path: str) -> int:
    for _ in range(10):
        write_parquet(path, "test", n_test=50)
    return len(pd.read_parquet(path))


def test_concurrent_writers_of_one_cache_file_all_succeed(tmp_path):
    """Runs started together on one cache_dir write the same toy file at once (a fixed temp name raced)."""
    from concurrent.futures import ProcessPoolExecutor

    path = tmp_path / "toy" / "test.parquet"
    with ProcessPoolExecutor(4) as pool:
        assert list(pool.map(_write_many, [str(path)] * 4)) == [50] * 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["test.parquet"]


def test_the_shipped_warm_starts_record_is_its_held_out_accuracy():
    # 0.236 on the 500 held-out problems, recomputed from the shipped weights (greedy answers measured
    # identical under ATen avx2, avx512 and the scalar kernels)
    from rpg.models.warmstart import SHIPPED_DIR

    meta = load_meta(SHIPPED_DIR)
    model, tokenizer = load_tiny(SHIPPED_DIR)
    held_out = toy_problems("test", seed=meta["settings"]["split_seed"], n_test=meta["settings"]["n_test"])
    assert meta["heldout_problems"] == len(held_out) == 500
    assert meta["heldout_greedy_acc"] == greedy_accuracy(model, tokenizer, held_out)
    train = toy_problems("train", seed=0)[:500]
    assert greedy_accuracy(model, tokenizer, train) != meta["heldout_greedy_acc"]  # tells the splits apart
