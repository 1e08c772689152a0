"""Agreement of the rubric judges with hand-labelled criterion decisions.

``rubric_judge_labels.jsonl`` (beside this file) holds completions to questions of the
shipped demo rubrics, each with one label per criterion of its rubric (1 = the
criterion is met, or for a pitfall: the mistake is made). Each judge scores every
(completion, criterion); a score >= 0.5 counts as "met". Reported per judge: accuracy,
Cohen's kappa, the mean score of criteria labelled 1 and 0, and ROC AUC of the scores.

    JAXPOST_CACHE=/tmp/jpcache python benchmarks/rubric_judge_agreement.py
    python benchmarks/rubric_judge_agreement.py --judges lexical   # no model load
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

LABELS = Path(__file__).with_name("rubric_judge_labels.jsonl")


def auc(scores: list[float], labels: list[int]) -> float:
    """Probability that a random positive scores above a random negative (ties: half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def kappa(pred: list[int], labels: list[int]) -> float:
    """Cohen's kappa of two binary raters."""
    n = len(labels)
    observed = sum(p == y for p, y in zip(pred, labels)) / n
    p1, y1 = sum(pred) / n, sum(labels) / n
    expected = p1 * y1 + (1 - p1) * (1 - y1)
    return (observed - expected) / (1 - expected) if expected < 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judges", default="lexical,model", help="comma-separated: lexical, model")
    ap.add_argument("--model", default="embedded:gemma3-270m", help="the model judge's source")
    args = ap.parse_args()

    from jaxpost.rewards.judges import LexicalJudge, ModelJudge
    from jaxpost.data.prompts import resolve_chat_template
    from jaxpost.rewards.rubrics import CriterionQuery, demo_rubrics_path, parse_rubric

    rubrics = {}
    for line in demo_rubrics_path().read_text().splitlines():
        row = json.loads(line)
        rubrics[row["question"]] = parse_rubric(row["rubric"])
    queries, labels = [], []
    for line in LABELS.read_text().splitlines():
        row = json.loads(line)
        crit = rubrics[row["question"]]
        assert len(crit) == len(row["labels"]), row["question"]
        for c, y in zip(crit, row["labels"]):
            queries.append(CriterionQuery(row["question"], row["completion"], c.text))
            labels.append(int(y))
    print(f"{len(labels)} labelled decisions ({sum(labels)} met), "
          f"{len(LABELS.read_text().splitlines())} completions")
    print(f"always 'met' baseline: accuracy {sum(labels) / len(labels):.3f}")

    for name in args.judges.split(","):
        if name == "lexical":
            judge = LexicalJudge()
        elif name == "model":
            from jaxpost.models.loading import load_model

            loaded = load_model(args.model, show_progress=False)
            judge = ModelJudge(loaded, resolve_chat_template(args.model), batch_size=16)
        else:
            raise ValueError(f"--judges: unknown judge {name!r}; use lexical or model")
        t = time.perf_counter()
        scores = judge.score_criteria(queries)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        judge.score_criteria(queries)
        warm = time.perf_counter() - t
        kept = [(s, y) for s, y in zip(scores, labels) if s is not None]
        s_kept, y_kept = [s for s, _ in kept], [y for _, y in kept]
        pred = [int(s >= 0.5) for s in s_kept]
        acc = sum(p == y for p, y in zip(pred, y_kept)) / len(kept)
        mean1 = sum(s for s, y in kept if y) / max(1, sum(y_kept))
        mean0 = sum(s for s, y in kept if not y) / max(1, len(kept) - sum(y_kept))
        print(f"{name:8s} scored {len(kept)}/{len(labels)} | accuracy {acc:.3f} | kappa "
              f"{kappa(pred, y_kept):+.3f} | AUC {auc(s_kept, y_kept):.3f} | mean score "
              f"met {mean1:.3f} vs not met {mean0:.3f} | {cold:.1f}s first call (with "
              f"compilation), {warm:.1f}s again")


if __name__ == "__main__":
    main()
