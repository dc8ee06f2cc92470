"""Reward functions: loading by spec, built-ins, weights, and errors that name function and sample."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from posttrain.rollout.generation import Rollout
from posttrain.rollout.prompts import PromptExample
from posttrain.rollout.rewards import (
    AccuracyReward,
    FormatReward,
    LengthPenalty,
    RewardFunctionError,
    RewardSpecError,
    extract_final_answer,
    load_reward_functions,
    reward_inputs,
    score_completions,
)


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent("""
        def shout(prompts, completions, **kwargs):
            return [float(c.count("!")) for c in completions]

        def by_answer(prompts, completions, answer):
            return [1.0 if a == "yes" else 0.0 for a in answer]

        LIMIT = 3
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_rewards", None)


# ---------------------------------------------------------------------------- loading


def test_module_function_specs(reward_module, monkeypatch):
    shout, by_answer = load_reward_functions(["my_rewards:shout", "my_rewards:by_answer"])
    assert shout(["p"], ["a!!"]) == [2.0]
    # a function without **kwargs gets only the columns it names
    total, per_fn = score_completions(
        [by_answer], None, ["p", "q"], ["x", "y"], {"answer": ["yes", "no"], "other": [1, 2]}
    )
    assert total.tolist() == [1.0, 0.0]
    # a file path works too, from any directory
    monkeypatch.chdir("/")
    (fn,) = load_reward_functions([f"{reward_module / 'my_rewards.py'}:shout"])
    assert fn(["p"], ["!"]) == [1.0]


def test_module_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_rewards.py").write_text(
        "def one(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        (fn,) = load_reward_functions(["cwd_rewards:one"])
        assert fn(["p"], ["c"]) == [1.0]
    finally:
        sys.modules.pop("cwd_rewards", None)


def test_bad_specs_name_the_spec(reward_module):
    with pytest.raises(RewardSpecError, match="'nope_mod:f'.*no module named 'nope_mod'"):
        load_reward_functions(["nope_mod:f"])
    with pytest.raises(RewardSpecError, match="'my_rewards:missing'.*no attribute 'missing'"):
        load_reward_functions(["my_rewards:missing"])
    with pytest.raises(RewardSpecError, match="'my_rewards:LIMIT'.*not callable"):
        load_reward_functions(["my_rewards:LIMIT"])
    with pytest.raises(RewardSpecError, match="'accuracyy'.*not a built-in"):
        load_reward_functions(["accuracyy"])
    with pytest.raises(RewardSpecError, match="invalid regular expression"):
        load_reward_functions(["format=(unclosed"])


def test_builtin_specs_and_arguments():
    acc, fmt, fmt2, pen, pen2, acc2 = load_reward_functions(
        [
            "accuracy",
            "format",
            r"format=^<think>.*</think>",
            "length_penalty",
            "length_penalty=0.5",
            "accuracy=label",
        ]
    )
    assert isinstance(acc, AccuracyReward) and acc.column == "answer" and acc2.column == "label"
    assert (
        isinstance(fmt, FormatReward)
        and fmt.pattern == r"#### -?\d+"
        and fmt2.pattern == "^<think>.*</think>"
    )
    assert isinstance(pen, LengthPenalty) and pen.scale == 0.001 and pen2.scale == 0.5


def test_reward_model_path_is_loaded_lazily(monkeypatch, tmp_path):
    import posttrain.rollout.rewards as rewards

    made = []
    monkeypatch.setattr(
        rewards, "_reward_model", lambda path, model_kwargs=None: made.append(path) or (lambda p, c, **k: [0.0] * len(c))
    )
    fns = load_reward_functions(["format", str(tmp_path)], reward_model_path="rm-dir")
    assert len(fns) == 3 and made == [str(tmp_path), "rm-dir"]


# ---------------------------------------------------------------------------- built-ins


def test_extract_final_answer():
    assert extract_final_answer("so 3 + 4 = 7.\n#### 7") == "7"
    assert extract_final_answer("#### 1\nwait, #### -12") == "-12"
    assert extract_final_answer("it is 5, no 6") == "6"
    assert extract_final_answer("costs $1,234.50 in total") == "$1,234.50"
    assert extract_final_answer("#### none") is None
    assert extract_final_answer("no digits") is None


def test_accuracy_on_hand_made_completions():
    completions = ["2 + 3 = 5\n#### 5", "#### 6", "the answer is 5", "#### 5.0", "1,000 apples", None]
    completions[-1] = "#### 5"
    answers = ["5", "5", "5", "5", "1000", None]
    out = AccuracyReward()(["p"] * 6, completions, answer=answers)
    assert out == [1.0, 0.0, 1.0, 1.0, 1.0, None]
    # GSM8K-style reference solutions and conversational completions
    conv = [[{"role": "assistant", "content": "... #### 72"}]]
    assert AccuracyReward()([[{"role": "user", "content": "q"}]], conv, answer=["48 + 24 = 72\n#### 72"]) == [
        1.0
    ]
    # non-numeric answers match exactly
    assert AccuracyReward()(["p", "p"], ["#### Paris", "paris"], answer=["Paris", "Paris"]) == [1.0, 0.0]
    with pytest.raises(KeyError, match="needs an 'answer' column"):
        AccuracyReward()(["p"], ["#### 5"])


def test_accuracy_agrees_with_the_demo_checker():
    from posttrain.demo.tasks import check_answer

    for text, ans in [("1 + 1 = 2.\n#### 2", "2"), ("#### 3", "2"), ("#### -4", "-4")]:
        assert AccuracyReward()(["p"], [text], answer=[ans]) == [float(check_answer(text, ans))]


def test_format_and_length_penalty():
    assert FormatReward()(["p"] * 3, ["x\n#### -3", "#### x", "####5"]) == [1.0, 0.0, 0.0]
    assert FormatReward(r"^<a>.*</a>$")(["p"] * 2, ["<a>\nyes\n</a>", "<a>no"]) == [1.0, 0.0]
    assert LengthPenalty(0.1)(["p"] * 2, ["a", "b"], completion_ids=[[1, 2, 3], []]) == pytest.approx(
        [-0.3, 0.0]
    )
    with pytest.raises(KeyError, match="completion_ids"):
        LengthPenalty()(["p"], ["a"])


# ---------------------------------------------------------------------------- scoring


def test_weights_total_and_unweighted_per_function_metrics():
    def one(prompts, completions, **kw):
        return [1.0, 0.0, 1.0, 0.0]

    def two(prompts, completions, **kw):
        return [2.0, None, 4.0, None]  # None: not applicable

    scores = score_completions([one, two], [0.5, 2.0], ["p"] * 4, ["a", "b", "c", "d"], {})
    total, per_fn = scores
    # hand-worked: 0.5*1 + 2*2 = 4.5; 0.5*0 + 0 = 0; 0.5*1 + 2*4 = 8.5; 0
    assert total.tolist() == [4.5, 0.0, 8.5, 0.0]
    assert per_fn["one"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert per_fn["two"].tolist() == [2.0, 0.0, 4.0, 0.0]
    m = scores.metrics()
    assert m["reward"] == pytest.approx(13.0 / 4)  # the weighted total, as the advantages see it
    assert m["rewards/one/mean"] == pytest.approx(0.5)  # unweighted
    assert m["rewards/two/mean"] == pytest.approx(3.0)  # over the 2 samples it applies to
    assert not torch.isnan(total).any()


def test_default_weights_duplicate_names_and_tensor_returns():
    def r(prompts, completions, **kw):
        return torch.tensor([1.0, 2.0])

    total, per_fn = score_completions([r, r], None, ["p", "q"], ["a", "b"])
    assert total.tolist() == [2.0, 4.0] and list(per_fn) == ["r", "r_2"]
    with pytest.raises(ValueError, match="1 reward weights for 2"):
        score_completions([r, r], [1.0], ["p", "q"], ["a", "b"])


def test_exception_names_function_sample_and_completion():
    def picky(prompts, completions, **kw):
        return [1.0 / (len(c) - 5) for c in completions]  # ZeroDivisionError on a 5-char completion

    with pytest.raises(RewardFunctionError) as info:
        score_completions([picky], None, ["p"] * 3, ["long enough", "five!", "x"], {})
    msg = str(info.value)
    assert "'picky'" in msg and "ZeroDivisionError" in msg and "sample 1" in msg and "'five!'" in msg


def test_nan_names_function_sample_and_truncated_completion():
    long = "y" * 200

    def nan_on_second(prompts, completions, **kw):
        return [0.0, math.nan]

    with pytest.raises(RewardFunctionError) as info:
        score_completions([nan_on_second], None, ["p", "p"], ["ok", long], {})
    msg = str(info.value)
    assert "'nan_on_second'" in msg and "nan for sample 1" in msg
    assert repr("y" * 80 + "…") in msg and "y" * 81 not in msg
    with pytest.raises(RewardFunctionError, match=r"inf for sample 0"):
        score_completions([lambda p, c, **k: [math.inf]], None, ["p"], ["a"])
    with pytest.raises(RewardFunctionError, match=r"returned a str for sample 0"):
        score_completions([lambda p, c, **k: ["1.0"]], None, ["p"], ["a"])


def test_wrong_number_of_values_is_an_error():
    def short(prompts, completions, **kw):
        return [1.0]

    with pytest.raises(RewardFunctionError, match="'short' returned 1 values for 3 completions"):
        score_completions([short], None, ["p"] * 3, ["a", "b", "c"], {})


def test_column_checks():
    f = FormatReward()
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2"):
        score_completions([f], None, ["p", "q"], ["a", "b"], {"answer": ["1"]})
    with pytest.raises(ValueError, match="may not be named 'prompts'"):
        score_completions([f], None, ["p"], ["a"], {"prompts": ["x"]})


def test_reward_inputs_from_a_rollout(tokenizer):
    conv = [{"role": "user", "content": "2+3?"}]
    examples = [
        PromptExample([1, 2], conv, {"answer": "5"}, row=1),
        PromptExample([1, 3], "plain", {"answer": "7"}, row=2),
    ]
    text_ids = tokenizer("#### 5", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    rollout = Rollout(
        prompt_ids=[[1, 2], [1, 3]],
        completion_ids=[text_ids + [eos], text_ids],
        sampler_logps=[[0.0] * (len(text_ids) + 1), [0.0] * len(text_ids)],
        truncated=[False, True],
        prompt_index=[0, 1],
        num_generations=1,
        stop_token_ids=[eos],
    )
    prompts, completions, columns = reward_inputs(examples, rollout, tokenizer)
    assert prompts == [conv, "plain"]
    assert completions == [[{"role": "assistant", "content": "#### 5"}], "#### 5"]
    assert columns["answer"] == ["5", "7"] and columns["completion_ids"] == rollout.completion_ids
    acc, fmt, pen = load_reward_functions(["accuracy", "format", "length_penalty=1"])
    total, per_fn = score_completions([acc, fmt, pen], [1.0, 0.5, 0.0], prompts, completions, columns)
    assert per_fn["accuracy"].tolist() == [1.0, 0.0]
    assert per_fn["length_penalty"].tolist() == [-(len(text_ids) + 1.0), -float(len(text_ids))]
    assert total.tolist() == [1.5, 0.5]


def test_pitfall_31_none_is_not_applicable_and_all_none_has_no_reward():
    """TRL semantics: None leaves the sample out of that function's sum and metrics. Sample 1 gets
    None from both functions: no reward (valid False, a warning), left out of `reward`.
    By hand (weights 0.5, 2): totals [0.5*1 + 2*2, -, 0.5*1, 2*4] = [4.5, 0, 0.5, 8]; reward mean
    over the 3 valid = 13/3; rewards/one/mean over its 3 = 2/3; rewards/two/mean over its 2 = 3."""

    def one(prompts, completions, **kw):
        return [1.0, None, 1.0, 0.0]

    def two(prompts, completions, **kw):
        return [2.0, None, None, 4.0]

    with pytest.warns(UserWarning, match=r"1 of 4 completions got None from every reward function.*sample 1"):
        scores = score_completions([one, two], [0.5, 2.0], ["p"] * 4, ["a", "b", "c", "d"], {})
    assert scores.total.tolist() == [4.5, 0.0, 0.5, 8.0]
    assert scores.valid.tolist() == [True, False, True, True]
    m = scores.metrics()
    assert m["reward"] == pytest.approx(13.0 / 3, rel=1e-6)  # float32 sums of 3 small numbers
    assert m["rewards/one/mean"] == pytest.approx(2.0 / 3, rel=1e-6)
    assert m["rewards/two/mean"] == pytest.approx(3.0, rel=1e-6)


def test_pitfall_31_grpo_advantages_skip_rewardless_samples():
    """The recipe path: score_completions' valid mask into group_advantages. Group of 4 with
    rewards [1, None, 0, 1]: the baseline is over [1, 0, 1] (mean 2/3), not [1, 0, 0, 1] (½)."""
    from posttrain.losses.advantages import group_advantages

    def fn(prompts, completions, **kw):
        return [1.0, None, 0.0, 1.0]

    with pytest.warns(UserWarning):
        scores = score_completions([fn], None, ["p"] * 4, ["a", "b", "c", "d"])
    adv = group_advantages(scores.total, 4, scale="none", valid=scores.valid)
    torch.testing.assert_close(adv, torch.tensor([1 / 3, 0.0, -2 / 3, 1 / 3]))
