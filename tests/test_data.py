"""Loading verl-schema parquet prompt sets, the prompt template, and the errors on bad files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rpg.data import PROMPT_TEMPLATE, dedupe_problems, load_prompt_set, make_math_prompt, question_from_prompt

BENCH_DIR = Path(__file__).resolve().parents[1] / "data" / "benchmarks"
# file: (rows, problems, data_source), from data/benchmarks/README.md
BENCHMARKS = {
    "aime-2024.parquet": (960, 30, "math_dapo"),
    "aime25.parquet": (960, 30, "aime2025"),
    "amc-23.parquet": (1280, 40, "amc_23"),
}


@pytest.mark.parametrize("file", sorted(BENCHMARKS))
def test_benchmark_counts(file):
    rows, problems, source = BENCHMARKS[file]
    ps = load_prompt_set(BENCH_DIR / file)
    assert ps.name == Path(file).stem
    assert len(ps) == rows and ps.num_problems == problems
    assert set(Counter(ps.problem_ids).values()) == {32}  # 32 copies of every problem
    assert sorted(set(ps.problem_ids)) == list(range(problems))
    assert set(ps.data_sources) == {source}
    for column in (ps.messages, ps.raw_problems, ps.ground_truths, ps.data_sources):
        assert len(column) == rows
    truth_of = {}
    for pid, truth in zip(ps.problem_ids, ps.ground_truths):
        assert truth_of.setdefault(pid, truth) == truth  # copies agree on the answer


@pytest.mark.parametrize("file", sorted(BENCHMARKS))
def test_every_prompt_is_the_template_of_its_raw_problem(file):
    ps = load_prompt_set(BENCH_DIR / file)
    for chat, raw in zip(ps.messages, ps.raw_problems):
        assert len(chat) == 1 and chat[0]["role"] == "user"
        assert chat[0]["content"] == make_math_prompt(raw)
        assert question_from_prompt(chat[0]["content"]) == raw


def test_problem_ids_are_not_extra_info_index():
    # in aime25 extra_info.index is the copy number: grouping by it would mix 30 problems per group
    table = pq.read_table(BENCH_DIR / "aime25.parquet")
    index = [info["index"] for info in table.column("extra_info").to_pylist()]
    ps = load_prompt_set(BENCH_DIR / "aime25.parquet")
    rows_of_problem_0 = [i for i, pid in enumerate(ps.problem_ids) if pid == 0]
    assert sorted(index[i] for i in rows_of_problem_0) == list(range(32))


def test_make_math_prompt_exact_text():
    expected = (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        "What is $1+{1}$?\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    )
    assert make_math_prompt("What is $1+{1}$?") == expected
    assert PROMPT_TEMPLATE.format(question="Q") == make_math_prompt("Q")
    assert question_from_prompt("not templated") == "not templated"


def test_dedupe_problems():
    ps = load_prompt_set(BENCH_DIR / "amc-23.parquet")
    one = dedupe_problems(ps)
    assert len(one) == 40 and one.problem_ids == list(range(40))
    assert len(set(one.raw_problems)) == 40
    first = ps.problem_ids.index(7)
    assert one.raw_problems[7] == ps.raw_problems[first] and one.ground_truths[7] == ps.ground_truths[first]


def test_max_rows_and_name():
    ps = load_prompt_set(BENCH_DIR / "aime25.parquet", name="aime25_small", max_rows=64)
    assert ps.name == "aime25_small" and len(ps) == 64
    assert ps.ground_truths == load_prompt_set(BENCH_DIR / "aime25.parquet").ground_truths[:64]
    with pytest.raises(ValueError, match="max_rows"):
        load_prompt_set(BENCH_DIR / "aime25.parquet", max_rows=0)


def _rows(n: int, with_extra: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        row = {
            "data_source": "toy",
            "prompt": [{"content": make_math_prompt(f"What is {i} + 1?"), "role": "user"}],
            "reward_model": {"ground_truth": str(i + 1), "style": "rule"},
        }
        if with_extra:
            row["extra_info"] = {"index": 0, "raw_problem": f"What is {i} + 1?"}
        rows.append(row)
    return rows


def test_relative_paths_try_cwd_then_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(load_prompt_set("data/benchmarks/aime25.parquet")) == 960  # found under the project root
    (tmp_path / "data" / "benchmarks").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_rows(2)), tmp_path / "data" / "benchmarks" / "aime25.parquet")
    assert len(load_prompt_set("data/benchmarks/aime25.parquet")) == 2  # the current directory wins


def test_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet.*looked at"):
        load_prompt_set(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match="DAPO-Math-17k is not shipped"):
        load_prompt_set("data/dapo-math-17k.parquet")


def test_missing_column_is_named(tmp_path):
    rows = _rows(3)
    for row in rows:
        del row["reward_model"]
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['reward_model'\].*expected verl's RL parquet schema"):
        load_prompt_set(path)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(BENCH_DIR / "aime25.parquet").slice(0, 0), path)
    with pytest.raises(ValueError, match=r"empty \(0 rows\)"):
        load_prompt_set(path)


def test_raw_problem_recovered_from_prompt_without_extra_info(tmp_path):
    path = tmp_path / "train.parquet"
    rows = _rows(3, with_extra=False) + _rows(3, with_extra=False)  # each problem twice
    pq.write_table(pa.Table.from_pylist(rows), path)
    ps = load_prompt_set(path)
    assert ps.raw_problems[:3] == ["What is 0 + 1?", "What is 1 + 1?", "What is 2 + 1?"]
    assert ps.problem_ids == [0, 1, 2, 0, 1, 2]
    assert ps.ground_truths == ["1", "2", "3", "1", "2", "3"]


def test_null_ground_truth_is_an_error(tmp_path):
    rows = _rows(2)
    rows[1]["reward_model"] = {"ground_truth": None, "style": "rule"}
    path = tmp_path / "null.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError, match="row 1 has no reward_model.ground_truth"):
        load_prompt_set(path)
