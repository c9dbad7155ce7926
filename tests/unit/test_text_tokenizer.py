"""A trained tokenizer is the same in every process: same texts, same JSON bytes, same ids.

The Rust trainers iterate hash maps seeded per process, so the check trains in two separate
Python processes (through the ETL's own ``_train``) and compares what they saved.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from preprocessing.config import TextConfig
from preprocessing.features.text import PAD, UNK, _train

REPO = Path(__file__).resolve().parents[2]
PROBES = ["the quick brown fox", "Zyx wvut ##a qq", "éa aé ab ba abab"]
VOCAB_SIZES = (60, 200, 2000)  # cut inside the merges (ties at the cut) and not reached

_SCRIPT = """
import json, sys
from preprocessing.config import TextConfig
from preprocessing.features.text import _train
from tests.unit.test_text_tokenizer import PROBES, VOCAB_SIZES, corpus

out = {}
for algorithm in ("wordpiece", "bpe"):
    for size in VOCAB_SIZES:
        tok = _train(corpus(), TextConfig(algorithm=algorithm, vocab_size=size))
        ids = [e.ids for e in tok.encode_batch(PROBES)]
        out[f"{algorithm}/{size}"] = {"json": tok.to_str(), "ids": ids}
json.dump(out, sys.stdout)
"""


def corpus() -> list[str]:
    """Seeded texts: random words over a small alphabet, so many pair counts tie."""
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyzé"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(300)]
    return [" ".join(rng.choices(words, k=rng.randint(3, 20))) for _ in range(400)]


def _run_twice() -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = []
    for p in procs:
        stdout, _ = p.communicate(timeout=120)
        assert p.returncode == 0, "the training subprocess failed (its stderr is above)"
        outs.append(json.loads(stdout))
    return outs


def test_two_processes_train_byte_identical_tokenizers() -> None:
    first, second = _run_twice()
    assert first.keys() == second.keys() and len(first) == 2 * len(VOCAB_SIZES)
    for name in first:
        assert first[name]["ids"] == second[name]["ids"], name
        assert first[name]["json"] == second[name]["json"], name
        tok = Tokenizer.from_str(first[name]["json"])
        assert (tok.token_to_id(PAD), tok.token_to_id(UNK)) == (0, 1), name


def test_wordpiece_keeps_only_pad_and_unk_special_and_its_vocab_size() -> None:
    tok = _train(corpus(), TextConfig(algorithm="wordpiece", vocab_size=200))
    added = json.loads(tok.to_str())["added_tokens"]
    assert [(a["id"], a["content"], a["special"]) for a in added] == [
        (0, PAD, True),
        (1, UNK, True),
    ]
    assert tok.get_vocab_size(with_added_tokens=True) == 200
    # "##a" in the input is split as text ("##" is unknown here), not matched as one token
    assert tok.encode("x ##a").tokens == ["x", UNK, "a"]
    # the continuation tokens of every char seen inside a word are in the vocabulary
    assert all(f"##{c}" in tok.get_vocab() for c in "abcdefghijklmnopqrstuvwxyzé")
