"""The SFT benchmark's workload: a deterministic, variable-length chat dataset.

Every row is one conversation, `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`,
built from a seeded RNG, so two runs (and both tools) see the same bytes. Lengths vary widely
(roughly 20-400 tokens with the SmolLM2 chat template) so that packing matters.

The text is homogeneous (every row is drawn from the same distributions), which makes the
step-0 loss of two tools comparable even when they pack different rows into their first batch.

Standard library only: it is imported by both the posttrain runner (.venv) and the TRL runner
(.venv-bench).

    python benchmarks/workload.py --out benchmarks/.data/sft.jsonl --rows 512 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_ROWS = 512
DEFAULT_SEED = 0

_SUBJECTS = [
    "the river", "a small robot", "the old library", "my neighbour", "the compiler", "a red kite",
    "the orchestra", "the city council", "a tired student", "the harbour", "the garden", "a fox",
    "the weather station", "the night train", "a quiet village", "the museum", "the bakery",
]
_VERBS = [
    "describes", "remembers", "builds", "measures", "explains", "follows", "repairs", "paints",
    "counts", "visits", "questions", "collects", "improves", "ignores", "celebrates", "studies",
]
_OBJECTS = [
    "the morning light", "a list of prime numbers", "three wooden chairs", "the summer festival",
    "an unfinished map", "the rules of chess", "a bowl of soup", "the northern mountains",
    "a forgotten letter", "the speed of sound", "the price of bread", "a broken clock",
    "the history of tea", "a new bridge", "the migration of birds", "the first snow",
]
_ADVERBS = [
    "carefully", "slowly", "every evening", "without a word", "with great care", "twice a week",
    "before sunrise", "in silence", "for the first time", "again and again", "quite happily",
]
_QUESTIONS = [
    "Can you tell me a short story about {s}?",
    "Explain in plain words why {s} {v} {o}.",
    "Write a few sentences on how {s} {v} {o} {a}.",
    "What would happen if {s} {v} {o}?",
    "Summarise what you know about {o}.",
    "Give me some notes about {s} and {o}.",
]


def _sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.5:
        s += f" {rng.choice(_ADVERBS)}"
    if rng.random() < 0.3:
        s += f", and {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    return s[0].upper() + s[1:] + "."


def _paragraph(rng: random.Random, n_sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(n_sentences))


def make_row(rng: random.Random) -> dict:
    """One conversation; a sentence is ~8-14 tokens, so the lengths below give ~20-400 tokens."""
    question = rng.choice(_QUESTIONS).format(
        s=rng.choice(_SUBJECTS), v=rng.choice(_VERBS), o=rng.choice(_OBJECTS), a=rng.choice(_ADVERBS)
    )
    # A long-tailed prompt context and answer length: most rows short, some long.
    if rng.random() < 0.35:
        question = _paragraph(rng, rng.randint(1, 8)) + " " + question
    n_answer = min(int(rng.expovariate(1 / 7)) + 1, 26)
    answer = _paragraph(rng, n_answer)
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def generate(rows: int = DEFAULT_ROWS, seed: int = DEFAULT_SEED) -> list[dict]:
    rng = random.Random(seed)
    return [make_row(rng) for _ in range(rows)]


def write_jsonl(path: str | Path, rows: int = DEFAULT_ROWS, seed: int = DEFAULT_SEED) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in generate(rows, seed))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / ".data" / "sft.jsonl"))
    ap.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = ap.parse_args()
    print(write_jsonl(args.out, args.rows, args.seed))


if __name__ == "__main__":
    main()
