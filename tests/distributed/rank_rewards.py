"""A reward function for the multi-process tests: deterministic in the completion, and it writes
what each process saw (uid, completion) to $POSTTRAIN_TEST_ROLLOUT_LOG.<rank>, one JSON line per
completion, so a test can check which prompts each rank sampled and what it generated."""

from __future__ import annotations

import json
import os


def logged_length(prompts, completions, uid=None, **columns):
    path = os.environ.get("POSTTRAIN_TEST_ROLLOUT_LOG")
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    if path:
        with open(f"{path}.{os.environ.get('RANK', '0')}", "a") as f:
            for u, t in zip(uid or [None] * len(texts), texts):
                f.write(json.dumps({"uid": u, "completion": t}) + "\n")
    # varies between completions (non-zero advantages), the same on every process
    return [(len(t) % 7) / 7 - 0.5 for t in texts]
