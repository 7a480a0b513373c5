"""Which runs a table or figure may average, and into which tables they fall.

Runs are averaged only when they differ in nothing but the seed:
  1. the user's filters (``--where key=value``) keep the runs they ask for;
  2. runs whose status is not chosen (default FINISHED) are listed, never averaged;
  3. runs of one configuration (same ``config_hash`` tag: the same command run twice) count once, the
     latest finished; the others are listed as duplicates;
  4. a *method* is the ``group_by`` columns (default the ``algo`` tag) plus every ``algo.*`` setting that
     varies within an algorithm (an ablation in the sweep);
  5. every other setting that varies across the kept runs (a context length, ``steps``, a model, a
     learning rate) splits them into separate tables, one per combination of values; each table says
     which values it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

#: run columns that do not change what a run computes (its folder, name, store, checkpointing)
NOT_SETTINGS = {"name", "save_every", "resume", "cache_dir", "dry_run", "out_dir", "sweep",
                "data.kl_coef"}  # data.kl_coef acts through algo.kl_coef, which is compared
NOT_SETTING_PREFIXES = ("tag.", "param.", "tracking.", "cluster.", "hydra.")
#: top-level settings that are runs' params (the other undotted columns are tags: algo, seed, git_sha, ...)
TOP_LEVEL_SETTINGS = ("steps", "eval_every")


@dataclass
class Selection:
    runs: pd.DataFrame  # the runs that are averaged, one per configuration
    status: pd.DataFrame  # every run: run_id, run_name, algo, seed, status, counted (yes / why not)
    method_keys: list[str]  # the columns that define a method
    split_keys: list[str]  # the settings that put runs into separate tables
    where: dict[str, str]

    def groups(self) -> list[tuple[dict, pd.DataFrame]]:
        """(values of split_keys, runs) per table, in a stable order; one group when nothing splits."""
        if not self.split_keys:
            return [({}, self.runs)]
        keyed = self.runs.assign(**{f"_s{i}": self.runs[k].astype(str) for i, k in enumerate(self.split_keys)})
        cols = [f"_s{i}" for i in range(len(self.split_keys))]
        out = []
        for _, idx in sorted(keyed.groupby(cols, dropna=False).groups.items(), key=lambda kv: _sort_key(kv[0])):
            sub = self.runs.loc[idx]
            out.append(({k: sub[k].iloc[0] for k in self.split_keys}, sub))
        return out


def _sort_key(values) -> tuple:
    values = values if isinstance(values, tuple) else (values,)
    return tuple((0, float(v), "") if _is_number(v) else (1, 0.0, str(v)) for v in values)


def _is_number(v) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def parse_where(items: list[str] | None) -> dict[str, str]:
    where = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--where {item!r}: expected KEY=VALUE, e.g. --where data.max_response_len=4096")
        where[key.strip()] = value.strip()
    return where


def _matches(column: pd.Series, value: str) -> pd.Series:
    if _is_number(value) and pd.api.types.is_numeric_dtype(column):
        return column.astype(float) == float(value)
    return column.astype(str) == value


def settings(runs: pd.DataFrame) -> list[str]:
    """The run columns that are settings of what a run computes (params), seed excluded."""
    return [c for c in runs.columns
            if (("." in c and not c.startswith(NOT_SETTING_PREFIXES)) or c in TOP_LEVEL_SETTINGS)
            and c not in NOT_SETTINGS]


def _varies(col: pd.Series) -> bool:
    return col.astype(str).nunique(dropna=False) > 1


def varying_within(runs: pd.DataFrame) -> list[str]:
    """The ``algo.*`` settings that differ between ``runs`` (of one algorithm: an ablation)."""
    return [c for c in runs.columns if c.startswith("algo.") and c != "algo.name" and _varies(runs[c])]


def select(runs: pd.DataFrame, statuses=("FINISHED",), group_by=("algo",), where: dict | None = None) -> Selection:
    where = dict(where or {})
    for col in group_by:
        if col not in runs:
            raise ValueError(f"cannot group by {col!r}: not a run tag or param (have: {', '.join(runs.columns)})")
    kept = runs
    for key, value in where.items():
        if key not in runs:
            raise ValueError(f"--where {key}={value}: {key!r} is not a run tag or param; settings: "
                             f"{', '.join(settings(runs)) or 'none'}")
        kept = kept[_matches(kept[key], value)]
    if kept.empty:
        raise ValueError(f"no run matches --where {' '.join(f'{k}={v}' for k, v in where.items())}")
    counted = pd.Series("yes", index=runs.index)
    counted[~runs.index.isin(kept.index)] = "no: left out by --where"
    ok = kept["status"].isin(statuses)
    counted[kept.index[~ok]] = [f"no: status {s}" for s in kept.loc[~ok, "status"]]
    kept = kept[ok]
    kept, duplicates = _one_per_configuration(kept)
    for run_id, keeper in duplicates.items():
        counted[runs.index[runs["run_id"] == run_id]] = f"no: same config_hash as {keeper}, which is counted"
    method_keys = list(group_by)
    by_algo = "algo" in group_by and "algo" in kept
    if by_algo:  # an algorithm's own settings define it; those that vary within one split it into methods
        method_keys += [c for c in dict.fromkeys(c for _, g in kept.groupby("algo") for c in varying_within(g))
                        if c not in method_keys]
    split_keys = [c for c in settings(kept) if c not in method_keys and _varies(kept[c])
                  and not (by_algo and c.startswith("algo."))]
    if not by_algo and "algo" in kept and _varies(kept["algo"]):  # a grouping without the algorithm
        split_keys.insert(0, "algo")
    cols = [c for c in ("run_id", "run_name", "algo", "seed", "status") if c in runs]
    status = runs[cols].assign(counted=counted.to_numpy())
    return Selection(kept, status, method_keys, split_keys, where)


def _one_per_configuration(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """The latest run of each config_hash (by end, then start time); {left-out run_id: kept run's name}."""
    if "config_hash" not in runs or runs.empty:
        return runs, {}
    order = runs.assign(_end=runs["end_time"].astype("Float64").fillna(-1),
                        _start=runs["start_time"].astype("Float64").fillna(-1))
    order = order.sort_values(["_end", "_start"], ascending=False)
    has_hash = order["config_hash"].notna()
    first = order[has_hash].drop_duplicates("config_hash")
    keeper = dict(zip(first["config_hash"], first["run_name"]))
    dup = order[has_hash & ~order.index.isin(first.index)]
    kept = runs.loc[runs.index.isin(first.index) | ~runs["config_hash"].notna()]
    return kept, {r: keeper[h] for r, h in zip(dup["run_id"], dup["config_hash"])}


def describe(values: dict) -> str:
    """``data.max_response_len=4096, steps=400`` for a table's heading."""
    return ", ".join(f"{k}={fmt(v)}" for k, v in values.items())


def fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
