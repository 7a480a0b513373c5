"""Checkpoint round trip, atomicity and retention."""

import os
import random

import numpy as np
import pytest
import torch

from rpg.backend.checkpoint import (
    LATEST,
    list_checkpoints,
    load_latest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train_step(model, opt):
    loss = model(torch.randn(5, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_round_trip_model_optimizer_rng(tmp_path):
    model, opt = _model_and_optimizer(0)
    for _ in range(3):
        _train_step(model, opt)
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    random.random(), np.random.normal(), torch.rand(2)  # advance the generators (gauss cache too)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
             "data_position": 42, "mlflow_run_id": "abc123"}
    save_checkpoint(tmp_path, 3, state)
    expected = (random.random(), np.random.normal(size=3), torch.rand(4))
    _train_step(model, opt)
    expected_params = [p.detach().clone() for p in model.parameters()]

    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # scramble everything
    model2, opt2 = _model_and_optimizer(1)
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt["step"] == 3 and ckpt["data_position"] == 42 and ckpt["mlflow_run_id"] == "abc123"
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    assert random.random() == expected[0]
    np.testing.assert_array_equal(np.random.normal(size=3), expected[1])
    torch.testing.assert_close(torch.rand(4), expected[2], atol=0, rtol=0)
    # the same step from the restored state lands on bit-identical parameters
    _train_step(model2, opt2)
    for p, q in zip(model2.parameters(), expected_params, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=0, rtol=0)


def test_partial_file_is_never_loaded(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.tensor([1.0])})
    # what a crash in the middle of saving step 2 leaves behind: a truncated temp file
    (tmp_path / ".step_2.pt.k3j2h1.tmp").write_bytes(b"PK\x03\x04 truncated")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt["step"] == 1
    torch.testing.assert_close(ckpt["x"], torch.tensor([1.0]), atol=0, rtol=0)
    # the next save removes the stray temp file and leaves no temp file of its own
    save_checkpoint(tmp_path, 2, {"x": torch.tensor([2.0])})
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step_1.pt", "step_2.pt"]
    assert load_latest_checkpoint(tmp_path)["step"] == 2


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.tensor([1.0])})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom while serialising")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(tmp_path, 2, {"bad": Unpicklable()})
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step_1.pt"]
    assert (tmp_path / LATEST).read_text().strip() == "step_1.pt"
    assert load_latest_checkpoint(tmp_path)["step"] == 1


def test_keep_last_k(tmp_path):
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [40, 50]
    assert (tmp_path / LATEST).read_text().strip() == "step_50.pt"
    torch.testing.assert_close(load_latest_checkpoint(tmp_path)["w"], torch.full((2,), 50.0),
                               atol=0, rtol=0)


def test_latest_pointer_and_fallback(tmp_path):
    assert load_latest_checkpoint(tmp_path / "missing") is None
    assert load_latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 5, {}, keep_last=0)
    save_checkpoint(tmp_path, 7, {}, keep_last=0)
    # `latest` names the last save, even when it is not the highest step (a restarted run)
    save_checkpoint(tmp_path, 6, {}, keep_last=0)
    assert load_latest_checkpoint(tmp_path)["step"] == 6
    os.unlink(tmp_path / "step_6.pt")  # pointer to a missing file: newest present wins
    assert load_latest_checkpoint(tmp_path)["step"] == 7


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_newest_checkpoint_falls_back_to_an_intact_one(tmp_path, damage, caplog):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))})
    newest = tmp_path / "step_2.pt"
    data = newest.read_bytes()
    newest.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    with caplog.at_level("WARNING", logger="rpg.backend.checkpoint"):
        ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt["step"] == 1
    torch.testing.assert_close(ckpt["w"], torch.full((2,), 1.0), atol=0, rtol=0)
    assert "step_2.pt" in caplog.text and "skipping unreadable checkpoint" in caplog.text


def test_no_readable_checkpoint_refuses_to_start_over(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {})
        (tmp_path / f"step_{step}.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"no readable checkpoint .*step_2\.pt .*step_1\.pt .*resume=never"):
        load_latest_checkpoint(tmp_path)


def test_checkpoints_are_read_without_executing_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    save_checkpoint(tmp_path, 1, {"ok": torch.zeros(1)})
    torch.save({"step": 2, "x": Payload()}, tmp_path / "step_2.pt")  # a file that would run code when unpickled
    (tmp_path / LATEST).write_text("step_2.pt\n")
    assert load_latest_checkpoint(tmp_path)["step"] == 1  # refused by weights_only, not executed
