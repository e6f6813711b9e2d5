"""Train the embedded content filter's heads and write ``src/batchd/contentfilter/heads.npz``.

For each of the four categories and each level k (low, medium, high), an L2-regularised
logistic regression over the all-MiniLM-L6-v2 sentence embedding (batchd's own numpy
MiniLM, so the features are exactly those of run time) predicts ``severity >= k``. The
regularisation is chosen by 5-fold cross-validation on the training split (log loss); the
head is then calibrated by Platt scaling on the out-of-fold logits, which keeps it linear
(``a * (w.x + b) + c``). The held-out split is never read here (see ``dataset.py``).

Needs only numpy and the MiniLM weights package. Run from the repository root::

    python scripts/content_filter/train.py            # writes the heads, prints CV figures
    python scripts/content_filter/evaluate.py         # the held-out precision and recall
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dataset

from batchd.contentfilter.embedded import EmbeddedClassifier
from batchd.localmodel.minilm import MiniLM

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "src" / "batchd" / "contentfilter" / "heads.npz"
LAMBDAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
FOLDS = 5
Array = npt.NDArray[np.float64]


def embed(texts: list[str]) -> Array:
    model = MiniLM(EmbeddedClassifier.require_weights())
    return model.embed(model.tokenize(texts)).astype(np.float64)


def fit(x: Array, y: Array, lam: float, iterations: int = 50) -> Array:
    """Newton's method for L2-regularised logistic regression; ``x`` has a bias column last
    (not regularised). Returns the weights, bias last."""
    d = x.shape[1]
    w = np.zeros(d)
    reg = np.full(d, lam)
    reg[-1] = 1e-6
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + reg * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def log_loss(y: Array, z: Array) -> float:
    return float(np.mean(np.logaddexp(0, z) - y * z))


def folds(lines: list[str], seed: int) -> list[Array]:
    """Cross-validation folds by written line: the variants of one line stay together."""
    unique = sorted(set(lines))
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[j]: i % FOLDS for i, j in enumerate(order)}
    return [
        np.array([n for n, line in enumerate(lines) if fold_of[line] == f]) for f in range(FOLDS)
    ]


def out_of_fold(x: Array, y: Array, lam: float, parts: list[Array]) -> Array:
    z = np.zeros(len(y))
    for held in parts:
        keep = np.setdiff1d(np.arange(len(y)), held)
        w = fit(x[keep], y[keep], lam)
        z[held] = x[held] @ w
    return z


def train_head(x: Array, y: Array, parts: list[Array]) -> tuple[Array, float, float]:
    """(weights with bias last, after calibration), the chosen lambda, the CV log loss."""
    scored = []
    for lam in LAMBDAS:
        z = out_of_fold(x, y, lam, parts)
        scored.append((log_loss(y, z), lam, z))
    loss, lam, z = min(scored, key=lambda s: s[0])
    a, c = fit(np.column_stack([z, np.ones_like(z)]), y, 1e-6)  # Platt scaling
    w = fit(x, y, lam)
    calibrated = w * a
    calibrated[-1] += c
    return calibrated, lam, loss


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    train, _ = dataset.split(dataset.load())
    print(f"training on {len(train)} examples (held-out split not read)")
    raw = embed([e.text for e in train])
    # Standardised features (the embedding's dimensions differ in spread); folded back into
    # the weights at the end, so the heads apply to the raw embedding.
    mean, std = raw.mean(axis=0), raw.std(axis=0) + 1e-6
    x = np.column_stack([(raw - mean) / std, np.ones(len(raw))])
    parts = folds([e.line for e in train], seed=12)
    weights = np.zeros((384, 12), dtype=np.float32)
    bias = np.zeros(12, dtype=np.float32)
    for ci, category in enumerate(dataset.CATEGORIES):
        sev = np.array([e.severities[ci] for e in train])
        for k in (1, 2, 3):
            y = (sev >= k).astype(np.float64)
            w, lam, loss = train_head(x, y, parts)
            weights[:, ci * 3 + k - 1] = w[:-1] / std
            bias[ci * 3 + k - 1] = w[-1] - float((w[:-1] * mean / std).sum())
            level = dataset.SEVERITIES[k]
            print(f"{category:10s} >= {level:6s}: {int(y.sum()):4d} positives, "
                  f"lambda {lam:g}, CV log loss {loss:.3f}")
    digest = hashlib.sha256(
        "\n".join(f"{e.severities}|{e.text}" for e in train).encode()
    ).hexdigest()
    np.savez_compressed(
        args.out,
        weights=weights,
        bias=bias,
        categories=np.array(dataset.CATEGORIES),
        embedding=np.array("all-minilm-l6-v2"),
        trained_on=np.array(f"{len(train)} examples, sha256 {digest[:16]}"),
    )
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
