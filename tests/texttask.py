"""A generated multi-class text task: topic words over a shared Zipf background (seeded).

Each class has its own topic words, many of them shared with another class, and a document
draws most of its words from a background common to all classes, so the classes overlap:
a TF-IDF + linear model does well but not perfectly. Words are pronounceable pseudo-words.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

__all__ = ["text_task", "write_text_task"]

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _words(n: int, rng: random.Random) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))))
    return sorted(out)


def text_task(
    docs: int = 1400,
    classes: int = 7,
    seed: int = 3,
    topical: float = 0.2,
    shared: int = 20,
    common: int = 2400,
    topic: int = 60,
) -> list[tuple[int, str, int]]:
    """``(id, text, label)`` rows: labels 0 … classes-1, balanced in expectation."""
    rng = random.Random(seed)
    vocab = _words(3000, rng)
    rng.shuffle(vocab)
    background = vocab[:common]
    weights = [1.0 / (i + 1) ** 1.05 for i in range(len(background))]
    pool = vocab[common:]
    topics = [rng.sample(pool, topic) for _ in range(classes)]
    for k in range(classes):  # a third of each topic is also the next class's
        topics[(k + 1) % classes] += topics[k][:shared]
    rows = []
    for i in range(docs):
        label = rng.randrange(classes)
        n = rng.randint(12, 40)
        k = sum(rng.random() < topical for _ in range(n))
        words = rng.choices(background, weights, k=n - k)
        words += rng.choices(topics[label], k=k)
        rng.shuffle(words)
        rows.append((i, " ".join(words), label))
    return rows


def write_text_task(path: Path, **kwargs: int) -> list[tuple[int, str, int]]:
    """Write :func:`text_task` as ``path/docs.csv`` (``id,text,label``); returns the rows."""
    rows = text_task(**kwargs)
    path.mkdir(parents=True, exist_ok=True)
    with (path / "docs.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "text", "label"])
        out.writerows(rows)
    return rows
