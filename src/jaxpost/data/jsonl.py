"""Reading JSONL files: one JSON object per line, bad lines counted, not fatal.

The datasets (jaxpost.data.datasets), rubrics, demonstrations and preference pairs all read their
files through :func:`read_jsonl`, so a file is judged the same way wherever it is named.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path


def read_jsonl(path: Path, expected: str, skipped: collections.Counter) -> list[dict]:
    """Rows of a JSONL file; blank lines are ignored, bad lines counted in `skipped`.

    Raises:
      FileNotFoundError: naming the file and ``expected`` (what it should hold).
    """
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} not found; expected {expected}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped["invalid JSON"] += 1
                continue
            if not isinstance(row, dict):
                skipped["not a JSON object"] += 1
                continue
            rows.append(row)
    return rows
