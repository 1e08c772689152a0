"""Evaluation reports: one model's metrics and examples, or two side by side, as text
tables and as JSON / JSONL files (written atomically).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

from jaxpost.runtime.atomic import write_atomic

__all__ = ["Comparison", "EvalReport", "comparison_table", "examples_path"]

_METRIC_ORDER = ("accuracy", "format_rate", "partial_credit", "pass@{k}",
                 "mean_completion_tokens", "truncated_rate")


@dataclasses.dataclass
class EvalReport:
    """One model's evaluation.

    Attributes:
      label: what was evaluated (``"base"``, or the LoRA export / run directory).
      settings: model, lora, checkpoint step, data, counts, sampling settings and the
        prompt settings used.
      metrics: see the module docstring; ``pass@k`` is keyed by its k (``"pass@1"``).
      examples: per-example records (:func:`jaxpost.eval_metrics.score_completions`)
        with ``index`` and ``prompt`` added.
      seconds: wall time of generation and scoring (model loading excluded).
    """

    label: str
    settings: dict[str, Any]
    metrics: dict[str, float]
    examples: list[dict[str, Any]]
    seconds: float

    def summary(self) -> dict[str, Any]:
        """The JSON summary: label, settings, metrics and seconds (no per-example data)."""
        return {"label": self.label, "settings": self.settings, "metrics": self.metrics,
                "seconds": round(self.seconds, 2)}

    def table(self) -> str:
        """The metrics as a two-column text table."""
        rows = [(name, _fmt(name, value)) for name, value in _ordered(self.metrics)]
        return _table(("metric", self.label), rows)

    def write(self, out: str | os.PathLike) -> tuple[Path, Path]:
        """Writes the summary to ``out`` (JSON) and the examples to :func:`examples_path`.

        Both files are written atomically. Returns ``(summary_path, examples_path)``.
        """
        out = Path(out)
        jsonl = examples_path(out)
        write_atomic(jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                    for r in self.examples))
        write_atomic(out, json.dumps({**self.summary(), "examples_file": jsonl.name},
                                     indent=2, ensure_ascii=False) + "\n")
        return out, jsonl


@dataclasses.dataclass
class Comparison:
    """Two evaluations on the same examples and seeds: ``a`` (reference) and ``b``."""

    a: EvalReport
    b: EvalReport

    def table(self) -> str:
        """``metric | A | B | delta`` with delta = B - A."""
        return comparison_table(self.a, self.b)

    def summary(self) -> dict[str, Any]:
        """The JSON summary: both summaries and the deltas (B - A) of shared metrics."""
        shared = [m for m in self.a.metrics if m in self.b.metrics]
        return {"a": self.a.summary(), "b": self.b.summary(),
                "delta": {m: self.b.metrics[m] - self.a.metrics[m] for m in shared}}

    def write(self, out: str | os.PathLike) -> tuple[Path, Path]:
        """Writes the summary to ``out`` (JSON) and one JSONL line per example to
        :func:`examples_path` (``{"index", "question", "reference", "a": {...},
        "b": {...}}``), both atomically. Returns ``(summary_path, examples_path)``."""
        out = Path(out)
        jsonl = examples_path(out)
        lines = []
        for ra, rb in zip(self.a.examples, self.b.examples):
            shared = {key: ra[key] for key in ("index", "question", "reference")}
            side = lambda r: {key: v for key, v in r.items() if key not in shared}  # noqa: E731
            lines.append(json.dumps({**shared, "a": side(ra), "b": side(rb)},
                                    ensure_ascii=False) + "\n")
        write_atomic(jsonl, "".join(lines))
        write_atomic(out, json.dumps({**self.summary(), "examples_file": jsonl.name},
                                     indent=2, ensure_ascii=False) + "\n")
        return out, jsonl


def comparison_table(a: EvalReport, b: EvalReport) -> str:
    """A text table ``metric | A: label | B: label | delta`` (delta = B - A)."""
    rows = []
    for name, value in _ordered(a.metrics):
        if name not in b.metrics:
            continue
        delta = b.metrics[name] - value
        rows.append((name, _fmt(name, value), _fmt(name, b.metrics[name]),
                     ("+" if delta >= 0 else "") + _fmt(name, delta)))
    return _table(("metric", f"A: {a.label}", f"B: {b.label}", "delta"), rows)


def examples_path(out: str | os.PathLike) -> Path:
    """Where the per-example JSONL of summary file ``out`` goes: ``out`` with suffix
    ``.jsonl`` (``eval.json`` -> ``eval.jsonl``, ``results`` -> ``results.jsonl``).

    Raises:
      ValueError: ``out`` itself ends in ``.jsonl`` (the two files would collide).
    """
    out = Path(out)
    if out.suffix == ".jsonl":
        raise ValueError(f"out={str(out)!r} ends in .jsonl, where the per-example file goes; "
                         "name the JSON summary, e.g. eval.json (examples: eval.jsonl)")
    return out.with_suffix(".jsonl")


def _ordered(metrics: dict[str, float]) -> list[tuple[str, float]]:
    def rank(name: str) -> int:
        key = "pass@{k}" if name.startswith("pass@") else name
        return _METRIC_ORDER.index(key) if key in _METRIC_ORDER else len(_METRIC_ORDER)

    return sorted(metrics.items(), key=lambda item: rank(item[0]))


def _fmt(name: str, value: float) -> str:
    return f"{value:.1f}" if name == "mean_completion_tokens" else f"{value:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(str(cell).ljust(w) for cell, w in zip(header, widths)).rstrip(),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
              for row in rows]
    return "\n".join(lines)
