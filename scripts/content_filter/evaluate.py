"""Precision and recall of the embedded content filter on the held-out split.

Loads the committed heads through batchd's run-time code (``batchd.contentfilter.embedded``)
and the held-out examples of ``dataset.py`` (never seen in training), and prints, per
category: precision and recall of ``filtered`` at each threshold (low, medium - the default -
and high), the severity confusion matrix, the calibration of P(severity >= medium) (expected
calibration error over 5 bins), the false positives on the hard negatives (safe texts about
the category: news, medicine, prevention, idioms) and every miss. Run from the repository
root: ``python scripts/content_filter/evaluate.py [--misses]``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dataset

from batchd.contentfilter.embedded import (
    EmbeddedClassifier,
    Heads,
    assessment,
)
from batchd.localmodel.minilm import MiniLM


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f} ({a}/{b})" if b else "n/a"


def ece(p: np.ndarray, y: np.ndarray, bins: int = 5) -> float:
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        if inside.any():
            total += inside.mean() * abs(p[inside].mean() - y[inside].mean())
    return float(total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--misses", action="store_true", help="list every miss")
    args = parser.parse_args()
    _, test = dataset.split(dataset.load())
    model = MiniLM(EmbeddedClassifier.require_weights())
    vectors = model.embed(model.tokenize([e.text for e in test]))
    heads = Heads.load()
    probs = heads.probabilities(vectors)
    found = [assessment(p) for p in probs]
    lines = len({e.line for e in test})
    print(f"held-out split: {len(test)} texts from {lines} written lines\n")
    print("| category | threshold | precision | recall | held-out positives |")
    print("|---|---|---|---|---|")
    summary = []
    for ci, category in enumerate(dataset.CATEGORIES):
        true = np.array([e.severities[ci] for e in test])
        pred = np.array([a.severities[ci] for a in found])
        for k, level in ((1, "low"), (2, "medium"), (3, "high")):
            tp = int(((pred >= k) & (true >= k)).sum())
            fp = int(((pred >= k) & (true < k)).sum())
            fn = int(((pred < k) & (true >= k)).sum())
            print(f"| {category} | {level} | {_ratio(tp, tp + fp)} | {_ratio(tp, tp + fn)} "
                  f"| {tp + fn} |")
        matrix = np.zeros((4, 4), dtype=int)
        for t, q in zip(true, pred, strict=True):
            matrix[t, q] += 1
        y = (true >= 2).astype(float)
        hard = [i for i, e in enumerate(test) if e.source == category and true[i] == 0]
        hard_fp = sum(1 for i in hard if pred[i] >= 2)
        general = [i for i, e in enumerate(test) if e.source == "general"]
        general_fp = sum(1 for i in general if pred[i] >= 2)
        summary.append((category, matrix, ece(probs[:, ci, 1], y), hard_fp, len(hard),
                        general_fp, len(general)))
    print()
    for category, matrix, cal, hard_fp, hard_n, gen_fp, gen_n in summary:
        print(f"{category}: ECE of P(>= medium) {cal:.3f}; filtered at medium: hard negatives "
              f"{hard_fp}/{hard_n}, everyday texts {gen_fp}/{gen_n}")
        print("  true \\ predicted  safe  low  medium  high")
        for t, row in enumerate(matrix):
            cells = "".join(f"{v:>6d}" for v in row)
            print(f"  {dataset.SEVERITIES[t]:>16s} {cells}")
    if args.misses:
        print("\nmisses at the default threshold (medium): expected -> found")
        for e, a in zip(test, found, strict=True):
            for ci, category in enumerate(dataset.CATEGORIES):
                t, q = e.severities[ci], a.severities[ci]
                if (t >= 2) != (q >= 2):
                    kind = "missed" if t >= 2 else "false alarm"
                    print(f"  {kind:11s} {category}: {dataset.SEVERITIES[t]} -> "
                          f"{dataset.SEVERITIES[q]}  {e.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
