"""Verifiable demo tasks, generated deterministically: small arithmetic with a strict answer format.

Correctness is checked exactly (`check_answer`), independent of any learned reward, so a gain on
held-out prompts is a measured fact rather than a model's opinion.

Regenerate the bundled files with `python -m posttrain.demo.tasks` (seeded; same files every time).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
ANSWER_RE = re.compile(r"####\s*(-?\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
TEMPLATES = [
    "What is {a} {op} {b}? End your reply with '#### <number>'.",
    "Compute {a} {op} {b}. Finish with the result written as #### <number>.",
    "Calculate {a} {op} {b} and give the final answer after ####.",
]


def make_problem(rng: random.Random) -> dict:
    op = rng.choice(["+", "+", "-", "*"])
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = rng.randint(1, 60), rng.randint(1, 60)
    answer = OPS[op](a, b)
    prompt = rng.choice(TEMPLATES).format(a=a, op=op, b=b)
    return {"prompt": prompt, "answer": str(answer), "a": a, "b": b, "op": op}


def solution_text(problem: dict) -> str:
    a, op, b, ans = problem["a"], problem["op"], problem["b"], problem["answer"]
    return f"{a} {op} {b} = {ans}.\n#### {ans}"


def extract_answer(text: str) -> str | None:
    match = ANSWER_RE.search(text)
    return match.group(1) if match else None


def check_answer(completion: str, answer: str) -> bool:
    """True when the completion states the right number in the required `#### N` form."""
    return extract_answer(completion) == str(answer)


def generate(seed: int = 1234, n_train: int = 512, n_eval: int = 64) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    problems = []
    while len(problems) < n_train + n_eval:
        p = make_problem(rng)
        key = f"{p['a']}{p['op']}{p['b']}"
        if key in seen:  # held-out prompts never appear in training, in any wording
            continue
        seen.add(key)
        problems.append(p)
    train = [{"messages": [{"role": "user", "content": p["prompt"]},
                           {"role": "assistant", "content": solution_text(p)}]} for p in problems[:n_train]]
    held_out = [{"prompt": [{"role": "user", "content": p["prompt"]}], "answer": p["answer"]}
                for p in problems[n_train:]]
    return train, held_out


def problem_key(problem: dict) -> str:
    return f"{problem['a']}{problem['op']}{problem['b']}"


def _held_out_keys(held_out: list[dict]) -> set[str]:
    """The problems of held-out rows, recovered from their prompt text."""
    keys = set()
    for row in held_out:
        match = re.search(r"(\d+) ([-+*]) (\d+)", row["prompt"][0]["content"])
        keys.add(f"{match.group(1)}{match.group(2)}{match.group(3)}")
    return keys


def generate_rl_prompts(seed: int = 555, n: int = 128, exclude: set[str] = frozenset()) -> list[dict]:
    """Prompts with their `answer` for the online methods (GRPO/PPO); none of `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude)
    rows = []
    while len(rows) < n:
        p = make_problem(rng)
        if problem_key(p) in seen:
            continue
        seen.add(problem_key(p))
        rows.append({"prompt": [{"role": "user", "content": p["prompt"]}], "answer": p["answer"]})
    return rows


def exact_judge(prompts, completions_a, completions_b, answer, **columns) -> list[float]:
    """An independent judge for win rates: P(a better than b) from exact answer checks — a right
    answer in the `#### N` form beats anything else; the right number without the form beats a
    wrong one; otherwise a tie (0.5). Never a learned model, so it cannot be gamed by training."""

    def grade(completion, ans) -> int:
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        if check_answer(text, ans):
            return 2
        return 1 if re.search(rf"(?<!\d){re.escape(str(ans))}(?!\d)", text) else 0

    out = []
    for a, b, ans in zip(completions_a, completions_b, answer):
        ga, gb = grade(a, ans), grade(b, ans)
        out.append(1.0 if ga > gb else 0.0 if ga < gb else 0.5)
    return out


def write_files(out_dir: Path = DATA_DIR) -> None:
    """The demo's bundled data: SFT conversations, held-out prompts, preference pairs and RL
    prompts; no held-out problem appears in any training file."""
    train, held_out = generate()
    held = _held_out_keys(held_out)
    prefs = _preferences_excluding(held)
    rl = generate_rl_prompts(exclude=held)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("sft_train.jsonl", train), ("eval_prompts.jsonl", held_out), ("preferences.jsonl", prefs),
                       ("rl_prompts.jsonl", rl)):
        with (out_dir / name).open("w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")


def _preferences_excluding(held: set[str], n: int = 256) -> list[dict]:
    rows, _ = generate_preferences(seed=4321, n_train=n + len(held), n_eval=0)
    return [r for r in rows if _held_out_keys([r]).isdisjoint(held)][:n]



def rejected_text(problem: dict, rng: random.Random) -> str:
    """A worse reply to the same problem: the right working without the required `#### N` line,
    a wrong number in the right format, or a refusal. Verifiably worse by `check_answer`."""
    a, op, b, ans = problem["a"], problem["op"], problem["b"], int(problem["answer"])
    kind = rng.random()
    if kind < 0.6:
        return f"{a} {op} {b} = {ans}."
    if kind < 0.7:
        wrong = ans + rng.choice([-3, -2, -1, 1, 2, 3, 10])
        return f"{a} {op} {b} = {wrong}.\n#### {wrong}"
    return "I am not able to help with arithmetic."


def generate_preferences(seed: int = 4321, n_train: int = 256, n_eval: int = 64) -> tuple[list[dict], list[dict]]:
    """Preference pairs (conversational, explicit prompt) on the arithmetic task: chosen is the
    correct answer in the required format, rejected a verifiably worse reply. Held-out pairs use
    problems that never appear in training."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n_train + n_eval:
        p = make_problem(rng)
        key = f"{p['a']}{p['op']}{p['b']}"
        if key in seen:
            continue
        seen.add(key)
        rows.append({"prompt": [{"role": "user", "content": p["prompt"]}],
                     "chosen": [{"role": "assistant", "content": solution_text(p)}],
                     "rejected": [{"role": "assistant", "content": rejected_text(p, rng)}],
                     "answer": p["answer"]})
    return rows[:n_train], rows[n_train:]


def generate_unpaired(seed: int = 987, n_train: int = 256, n_eval: int = 64) -> tuple[list[dict], list[dict]]:
    """KTO rows (prompt, completion, label) from the same pairs, unpaired: each problem contributes
    either its good or its bad reply (about 60 % desirable, so the classes are unequal)."""
    rng = random.Random(seed)
    train, held_out = generate_preferences(seed=seed, n_train=n_train, n_eval=n_eval)

    def unpair(rows):
        out = []
        for r in rows:
            good = rng.random() < 0.6
            out.append({"prompt": r["prompt"], "completion": r["chosen"] if good else r["rejected"], "label": good})
        return out

    return unpair(train), unpair(held_out)


if __name__ == "__main__":
    write_files()
    print(f"wrote {DATA_DIR}")
