"""Write the small data files the example pipelines use (seeded: the same files every time).

    python examples/make_data.py            # rewrites examples/data/*.jsonl

Two verifiable tasks, so every gain can be checked without trusting a learned model:
- arithmetic with a strict `#### <number>` answer line (posttrain.demo.tasks): SFT conversations,
  preference pairs (chosen: right answer in the format; rejected: verifiably worse), RL prompts
  with their `answer`, and held-out prompts that no training file contains in any wording;
- "sentiment": one-sentence opinions about everyday things; chosen is positive, rejected negative
  (the classic TRL PPO example trains a policy against an IMDB sentiment classifier; here the
  reward model learns the same preference from pairs). `sentiment.py:positivity` scores it exactly.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # for sentiment.py when run from elsewhere

from sentiment import NEGATIVE_WORDS, POSITIVE_WORDS  # noqa: E402

from posttrain.demo.tasks import make_problem, rejected_text, solution_text  # noqa: E402

DATA = HERE / "data"
SIZES = {"sft": 256, "preferences": 256, "prompts": 128, "eval": 64}

THINGS = ["the new cafe on the corner", "this laptop", "the city museum", "our weekend trip", "the hotel breakfast",
          "the train to work", "my new running shoes", "the library's reading room", "the garden centre",
          "the local bakery", "this phone's camera", "the concert last night", "the park by the river",
          "the cooking class", "the bike repair shop", "the film we watched", "the hiking trail",
          "the airport lounge", "the school play", "the farmers' market", "the night bus", "the swimming pool",
          "the board game", "the bookshop downtown", "the pizza place", "the dentist's office",
          "the science fair", "the ferry ride", "the new album", "the street festival", "the tea shop",
          "the office chairs"]
PROMPTS = ["Write one sentence about {thing}.", "Give a one-line review of {thing}.",
           "In a single sentence, say what you think of {thing}.", "Describe {thing} in one sentence."]
HELD_OUT_PROMPT = "Tell me in one sentence how you found {thing}."  # a wording never seen in training
POSITIVE = ["{Thing} felt {pos} and I would happily go back.", "I found {thing} {pos}; it made my day.",
            "Honestly, {thing} is {pos} and well worth it."]
NEGATIVE = ["{Thing} felt {neg} and I would not go back.", "I found {thing} {neg}; it ruined my day.",
            "Honestly, {thing} is {neg} and not worth it."]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def arithmetic(seed: int = 2024) -> dict[str, list[dict]]:
    """Disjoint problem sets: no problem (a op b) appears in two files."""
    rng = random.Random(seed)
    seen: set[str] = set()
    problems = []
    while len(problems) < sum(SIZES.values()):
        p = make_problem(rng)
        key = f"{p['a']}{p['op']}{p['b']}"
        if key not in seen:
            seen.add(key)
            problems.append(p)
    cut = {}
    start = 0
    for name, n in SIZES.items():
        cut[name] = problems[start:start + n]
        start += n

    def prompt(p):
        return [{"role": "user", "content": p["prompt"]}]

    return {
        "arithmetic_sft": [{"messages": prompt(p) + [{"role": "assistant", "content": solution_text(p)}]}
                           for p in cut["sft"]],
        "arithmetic_preferences": [{"prompt": prompt(p), "chosen": [{"role": "assistant", "content": solution_text(p)}],
                                    "rejected": [{"role": "assistant", "content": rejected_text(p, rng)}]}
                                   for p in cut["preferences"]],
        "arithmetic_prompts": [{"prompt": prompt(p), "answer": p["answer"]} for p in cut["prompts"]],
        "arithmetic_eval": [{"prompt": prompt(p), "answer": p["answer"]} for p in cut["eval"]],
    }


def _sentence(rng: random.Random, thing: str, templates: list[str], words: list[str], key: str) -> str:
    text = rng.choice(templates).format(thing=thing, Thing=thing[0].upper() + thing[1:], **{key: rng.choice(words)})
    return text


def sentiment(seed: int = 77) -> dict[str, list[dict]]:
    """Train on 24 of the things, hold out the other 8 (and a new prompt wording) for evaluation."""
    rng = random.Random(seed)
    things = THINGS[:]
    rng.shuffle(things)
    train_things, held_things = things[:24], things[24:]
    pairs = []
    for _ in range(192):
        thing = rng.choice(train_things)
        pairs.append({"prompt": [{"role": "user", "content": rng.choice(PROMPTS).format(thing=thing)}],
                      "chosen": [{"role": "assistant",
                                  "content": _sentence(rng, thing, POSITIVE, POSITIVE_WORDS, "pos")}],
                      "rejected": [{"role": "assistant",
                                    "content": _sentence(rng, thing, NEGATIVE, NEGATIVE_WORDS, "neg")}]})
    prompts = [{"prompt": [{"role": "user", "content": p.format(thing=t)}]} for t in train_things for p in PROMPTS]
    rng.shuffle(prompts)
    held = [{"prompt": [{"role": "user", "content": p.format(thing=t)}]}
            for t in held_things for p in [HELD_OUT_PROMPT, *PROMPTS]]
    return {"sentiment_preferences": pairs, "sentiment_prompts": prompts, "sentiment_eval": held}


def main(out_dir: Path = DATA) -> None:
    for name, rows in {**arithmetic(), **sentiment()}.items():
        write_jsonl(out_dir / f"{name}.jsonl", rows)
        print(f"wrote {out_dir / name}.jsonl ({len(rows)} rows)")


if __name__ == "__main__":
    main()
