"""Prompt sets stored as parquet in verl's RL layout, and the math prompt template (docs/algorithms.md section 9).

Expected columns (see data/benchmarks/README.md):

- ``data_source``: str, selects the reward function (``rpg.rewards.REWARDS``);
- ``prompt``: list of ``{"role", "content"}`` chat messages;
- ``reward_model``: ``{"ground_truth": str, ...}``;
- ``extra_info`` (optional): ``{"raw_problem": str, ...}``, the problem before templating.

Rows that share the raw problem text share a ``problem_id`` (the benchmarks hold 32 copies of each
problem). ``extra_info.index`` is not used: in some files it is the problem, in others the copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]

PROMPT_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
)
PROMPT_SUFFIX = 'Remember to put your answer on its own line after "Answer:".'
PROMPT_TEMPLATE = PROMPT_PREFIX + "\n\n{question}\n\n" + PROMPT_SUFFIX

REQUIRED_COLUMNS = ("data_source", "prompt", "reward_model")
SCHEMA_HELP = (
    "expected verl's RL parquet schema: data_source (str), prompt (list of {role, content}), "
    "reward_model ({ground_truth: str, style: str}), optionally extra_info ({raw_problem: str, ...}); "
    "see data/benchmarks/README.md"
)


def make_math_prompt(question: str) -> str:
    """The paper's user message for a math problem: instructions, the question, the Answer: reminder."""
    return PROMPT_TEMPLATE.format(question=question)


def question_from_prompt(prompt: str) -> str:
    """Inverse of ``make_math_prompt``; text not in that template is returned unchanged."""
    head, tail = PROMPT_PREFIX + "\n\n", "\n\n" + PROMPT_SUFFIX
    if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) >= len(head) + len(tail):
        return prompt[len(head) : len(prompt) - len(tail)]
    return prompt


@dataclass(frozen=True)
class PromptSet:
    """Rows of a prompt set, column by column (all lists have one entry per row)."""

    name: str
    messages: list[list[dict[str, str]]]  # chat messages to feed the tokenizer's chat template
    raw_problems: list[str]
    ground_truths: list[str]
    data_sources: list[str]
    problem_ids: list[int]  # 0, 1, ... in order of first appearance of each raw problem

    def __len__(self) -> int:
        return len(self.messages)

    @property
    def num_problems(self) -> int:
        return len(set(self.problem_ids))

    def select(self, rows: Sequence[int]) -> PromptSet:
        """A new set holding the given rows (problem ids kept)."""

        def pick(column: list) -> list:
            return [column[i] for i in rows]

        return dataclasses.replace(
            self,
            messages=pick(self.messages),
            raw_problems=pick(self.raw_problems),
            ground_truths=pick(self.ground_truths),
            data_sources=pick(self.data_sources),
            problem_ids=pick(self.problem_ids),
        )


def resolve_path(path: str | Path) -> Path:
    """An absolute path as is; a relative one against the current directory, then the project root."""
    path = Path(path).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path.cwd() / path, PROJECT_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    hint = ""
    if "dapo" in path.name.lower():
        hint = (
            " DAPO-Math-17k is not shipped with this project: download it on a machine with access to "
            "its model hub, convert it to a parquet file in verl's schema, and put it at "
            "$RPG_DATA_DIR/dapo-math-17k.parquet."
        )
    raise FileNotFoundError(
        f"prompt set not found: {path} (looked at {tried}).{hint} Set data.train_path=/abs/path/to/file.parquet (or the eval set's path) to an existing parquet file."
    )


def _messages(value: Any, row: int, path: Path) -> list[dict[str, str]]:
    if value is None or isinstance(value, (str, bytes)) or len(value) == 0:
        raise ValueError(f"{path}: row {row} has no chat messages in 'prompt'; {SCHEMA_HELP}")
    messages = []
    for message in value:
        if not isinstance(message, dict) or "content" not in message or "role" not in message:
            raise ValueError(f"{path}: row {row}: each prompt message needs 'role' and 'content'; {SCHEMA_HELP}")
        messages.append({"role": str(message["role"]), "content": str(message["content"])})
    return messages


def load_prompt_set(path: str | Path, name: str | None = None, max_rows: int | None = None) -> PromptSet:
    """Read a verl-schema parquet file into a ``PromptSet`` (first ``max_rows`` rows if given).

    ``name`` defaults to the file stem. The raw problem is ``extra_info.raw_problem`` when present,
    else the question recovered from the last prompt message.
    """
    import pyarrow.parquet as pq  # here: a run on in-memory prompts (the toy task) never imports pyarrow

    resolved = resolve_path(path)
    # one file (resolve_path checks), read on this thread: pq.read_table goes through pyarrow's dataset layer
    # and thread pool, 40 MB more peak memory for the toy set (measured), and nothing faster at these sizes
    table = pq.ParquetFile(resolved).read(use_threads=False)
    missing = [col for col in REQUIRED_COLUMNS if col not in table.column_names]
    if missing:
        raise ValueError(f"{resolved}: missing column(s) {missing} (found {table.column_names}); {SCHEMA_HELP}")
    if max_rows is not None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
        table = table.slice(0, max_rows)
    if table.num_rows == 0:
        raise ValueError(f"{resolved}: the prompt set is empty (0 rows); point the data path at a non-empty file")
    columns = table.select([c for c in (*REQUIRED_COLUMNS, "extra_info") if c in table.column_names]).to_pydict()
    return prompt_set_from_columns(columns, table.num_rows, name or resolved.stem, resolved)


def prompt_set_from_records(records: Sequence[dict], name: str) -> PromptSet:
    """A ``PromptSet`` from rows in the parquet schema held in memory (the toy task's)."""
    if not records:
        raise ValueError(f"{name}: the prompt set is empty (0 rows)")
    keys = [c for c in (*REQUIRED_COLUMNS, "extra_info") if c in records[0]]
    return prompt_set_from_columns({k: [r.get(k) for r in records] for k in keys}, len(records), name, name)


def prompt_set_from_columns(columns: dict[str, list], num_rows: int, name: str, origin) -> PromptSet:
    """Parse verl-schema columns (as ``to_pydict`` gives them) into a ``PromptSet``; ``origin`` (a path or a
    name) heads its error messages."""
    messages, raw_problems, ground_truths, data_sources = [], [], [], []
    extra_infos = columns.get("extra_info", [None] * num_rows)
    for row in range(num_rows):
        chat = _messages(columns["prompt"][row], row, origin)
        reward_model = columns["reward_model"][row] or {}
        truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
        if truth is None:
            raise ValueError(f"{origin}: row {row} has no reward_model.ground_truth; {SCHEMA_HELP}")
        source = columns["data_source"][row]
        if source is None:
            raise ValueError(f"{origin}: row {row} has no data_source; {SCHEMA_HELP}")
        extra = extra_infos[row] if isinstance(extra_infos[row], dict) else {}
        raw = extra.get("raw_problem") or question_from_prompt(chat[-1]["content"])
        messages.append(chat)
        raw_problems.append(str(raw))
        ground_truths.append(str(truth))
        data_sources.append(str(source))

    ids: dict[str, int] = {}
    problem_ids = [ids.setdefault(raw, len(ids)) for raw in raw_problems]
    return PromptSet(
        name=name,
        messages=messages,
        raw_problems=raw_problems,
        ground_truths=ground_truths,
        data_sources=data_sources,
        problem_ids=problem_ids,
    )


def dedupe_problems(prompt_set: PromptSet) -> PromptSet:
    """One row per problem (its first row), e.g. to draw k samples of each problem in evaluation."""
    first_rows: dict[int, int] = {}
    for row, pid in enumerate(prompt_set.problem_ids):
        first_rows.setdefault(pid, row)
    return prompt_set.select(list(first_rows.values()))
