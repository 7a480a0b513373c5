"""The repository speaks only of itself: every document a file points to is in it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = re.compile(r"[A-Za-z0-9_./-]*[A-Za-z0-9_]\.md\b")
#: written by `python -m analysis` into its --out folder, not part of the repository
GENERATED = {"last_best.md", "status.md", "tables/status.md", "paired_vs_grpo.md", "paired_vs_dapo.md", "verdicts.md",
             "tables/verdicts.md", "tables/last_best.md"}  # outputs of python -m analysis


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [REPO / n for n in names if n.endswith((".py", ".md", ".yaml", ".sh", ".toml")) and (REPO / n).is_file()]


def test_every_referenced_document_exists():
    missing = []
    for path in tracked_text_files():
        for ref in set(DOC.findall(path.read_text(errors="replace"))):
            if ref in GENERATED or (REPO / ref).is_file() or (path.parent / ref).is_file():
                continue
            missing.append(f"{path.relative_to(REPO)} -> {ref}")
    assert not missing, "references to documents that are not in the repository:\n" + "\n".join(missing)


def test_the_check_sees_a_dangling_reference(tmp_path):
    # the pattern finds the kind of pointer that used to dangle (a spec file outside the repository)
    name = "ALGORITHMS" + ".md"  # spelt apart so that this file does not point to it
    assert DOC.findall(f'"""The anchor ({name} section 6)."""') == [name]
    assert not (REPO / name).exists()
