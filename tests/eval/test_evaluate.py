"""`posttrain eval` on tiny random models: identities (a model against itself), two different
models, task accuracy independent of the reward, eval.json, errors, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain import EvalConfig, evaluate
from posttrain.cli import main as cli_main
from posttrain.demo.tasks import generate
from posttrain.eval.generation_eval import EvalSetupError
from tests.conftest import make_tiny_llama

SCORERS = Path(__file__).parent / "scorers.py"


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def held_out():
    _, rows = generate(seed=31, n_train=0, n_eval=6)
    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]


def _cfg(tmp_path, name="eval", **kw) -> EvalConfig:
    base = {"output_dir": str(tmp_path / name), "max_completion_length": 8, "num_samples": 2, "seed": 7,
            "reward_funcs": [f"{SCORERS}:text_length"], "per_device_eval_batch_size": 4}
    base.update(kw)
    return EvalConfig(**base)


def test_model_against_an_identical_copy_wins_half_and_has_zero_kl(tmp_path, tokenizer, held_out):
    """Two separately built copies of the same weights: every paired completion is the same, so
    each pair ties (win rate exactly 0.5, by reward and by a position-biased judge) and the KL of
    one to the other on its own samples is exactly 0 (k1 and k3)."""
    result = evaluate(_cfg(tmp_path, judge=f"{SCORERS}:first_shown_bias_longer"), model=make_tiny_llama(seed=0),
                      tokenizer=tokenizer, dataset=held_out, baseline_model=make_tiny_llama(seed=0))
    c = result.comparison
    for mode in ("greedy", "sampled"):
        assert c[f"{mode}/win_rate_reward"] == 0.5
        assert c[f"{mode}/win_rate_judge"] == 0.5
        assert c[f"{mode}/win_rate"] == 0.5  # the judge's, when there is one
    assert c["sampled/kl_k1"] == 0.0 and c["sampled/kl_k3"] == 0.0
    assert result.metrics["model"] == result.metrics["baseline"]


def test_two_models_compared_eval_json_and_report(tmp_path, tokenizer, held_out):
    a, b = make_tiny_llama(seed=0), make_tiny_llama(seed=1)
    result = evaluate(_cfg(tmp_path), model=a, tokenizer=tokenizer, dataset=held_out, baseline_model=b)
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert record["num_prompts"] == 6 and record["settings"]["num_samples"] == 2
    for who in ("model", "baseline"):
        m = record["metrics"][who]
        for key in ("greedy/reward", "sampled/reward", "sampled/rewards/text_length/mean", "greedy/accuracy",
                    "sampled/accuracy", "sampled/pass@2", "greedy/mean_length", "sampled/truncated_ratio"):
            assert key in m, (who, key)
        assert 0.0 <= m["greedy/accuracy"] <= 1.0
        assert 1 <= m["greedy/mean_length"] <= 8
    c = record["comparison"]
    assert 0.0 <= c["greedy/win_rate"] <= 1.0 and c["greedy/win_rate"] == c["greedy/win_rate_reward"]
    # different weights: k3 is a sum of non-negative terms that vanish only where the log-probs agree
    assert c["sampled/kl_k3"] > 0.0 and c["sampled/kl_k1"] != 0.0
    assert "sampled/win_rate_judge" not in c
    # the win rate by reward agrees with the per-prompt greedy rewards shown in the samples
    s = record["samples"]
    assert len(s) == 6 and all(row["mode"] == "greedy" for row in s)
    wins = [1.0 if r["model_reward"] > r["baseline_reward"] else 0.5 if r["model_reward"] == r["baseline_reward"]
            else 0.0 for r in s]
    assert c["greedy/win_rate"] == pytest.approx(sum(wins) / len(wins))
    assert [r["model_reward"] for r in s] == pytest.approx([len(r["model"]) / 10 for r in s])
    assert s[0]["answer"] == held_out[0]["answer"] and s[0]["prompt"] == held_out[0]["prompt"][0]["content"]
    assert result.metrics == record["metrics"] and result.samples == s
    assert "num_samples: 2" in (tmp_path / "eval" / "eval_config.yaml").read_text()
    page = (tmp_path / "eval" / "report.html").read_text()
    assert result.report_path == tmp_path / "eval" / "report.html"
    assert "Evaluation" in page and "sampled/kl_k3" in page and "before (baseline)" in page
    assert "data:image/png;base64," in page


def test_task_accuracy_comes_from_the_answers_not_the_reward(tmp_path, tokenizer, held_out):
    """Greedy answers of a fixed model are known after a first pass; make them the reference
    answers of half the prompts: greedy accuracy is then exactly 0.5 while a constant reward
    stays 1 — accuracy does not come from the reward."""
    model = make_tiny_llama(seed=0)
    first = evaluate(_cfg(tmp_path, "first", num_samples=0, reward_funcs=[f"{SCORERS}:always_one"]), model=model,
                     tokenizer=tokenizer, dataset=held_out)
    texts = [row["model"] for row in first.samples]
    rows = [{"prompt": r["prompt"], "answer": texts[i] if i % 2 == 0 else "not the model's answer"}
            for i, r in enumerate(held_out)]
    second = evaluate(_cfg(tmp_path, "second", num_samples=0, reward_funcs=[f"{SCORERS}:always_one"]), model=model,
                      tokenizer=tokenizer, dataset=rows)
    m = second.metrics["model"]
    assert m["greedy/accuracy"] == 0.5
    assert m["greedy/reward"] == 1.0
    assert [row["model_correct"] for row in second.samples] == [True, False] * 3
    assert "sampled/accuracy" not in m and "greedy/win_rate" not in second.comparison


def test_eval_refuses_settings_that_cannot_measure_anything(tmp_path, tokenizer, held_out):
    no_answers = [{"prompt": r["prompt"]} for r in held_out]
    with pytest.raises(EvalSetupError, match="nothing to measure"):
        evaluate(_cfg(tmp_path, reward_funcs=[]), model=make_tiny_llama(), tokenizer=tokenizer, dataset=no_answers)
    with pytest.raises(EvalSetupError, match="--judge compares two models"):
        evaluate(_cfg(tmp_path, judge=f"{SCORERS}:first_shown_bias_longer"), model=make_tiny_llama(),
                 tokenizer=tokenizer, dataset=held_out)
    with pytest.raises(EvalSetupError, match="--temperature > 0"):
        evaluate(_cfg(tmp_path, temperature=0.0), tokenizer=tokenizer, dataset=held_out)
    with pytest.raises(EvalSetupError, match="--reward_weights has 2 values for 1"):
        evaluate(_cfg(tmp_path, reward_weights=[1.0, 2.0]), tokenizer=tokenizer, dataset=held_out)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_compares_two_model_directories(tmp_path, tokenizer, tiny_model_dir, held_out, capsys):
    other = tmp_path / "other-model"
    make_tiny_llama(seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    data = _write_jsonl(tmp_path / "held.jsonl", held_out)
    out = tmp_path / "cli-eval"
    code = cli_main(["eval", "--model_name_or_path", str(tiny_model_dir), "--baseline", str(other),
                     "--dataset_name", str(data), "--reward_funcs", f"{SCORERS}:text_length", "accuracy",
                     "--num_samples", "2", "--max_completion_length", "6", "--max_eval_samples", "4",
                     "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    assert "sampled/kl_k1" in printed and "(model vs baseline)" in printed
    record = json.loads((out / "eval.json").read_text())
    assert record["num_prompts"] == 4 and record["baseline"] == str(other)
    assert "greedy/rewards/accuracy/mean" in record["metrics"]["model"]
    # the accuracy reward and the independent accuracy check agree on the same completions
    m = record["metrics"]["model"]
    assert m["greedy/rewards/accuracy/mean"] == m["greedy/accuracy"]
    assert record["comparison"]["sampled/kl_k3"] > 0
    assert (out / "report.html").exists()


def test_cli_from_config_file_and_bad_flag(tmp_path, tiny_model_dir, held_out, capsys):
    data = _write_jsonl(tmp_path / "held.jsonl", held_out[:3])
    cfg = tmp_path / "eval.yaml"
    out = tmp_path / "cfg-eval"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data}\noutput_dir: {out}\n"
                   f"reward_funcs: ['{SCORERS}:text_length']\nnum_samples: 0\nmax_completion_length: 4\n")
    assert cli_main(["eval", "--config", str(cfg)]) == 0
    record = json.loads((out / "eval.json").read_text())
    assert record["settings"]["num_samples"] == 0 and record["baseline"] is None
    assert set(record["metrics"]) == {"model"} and record["comparison"] == {}
    assert "greedy/reward" in record["metrics"]["model"]
    assert cli_main(["eval", "--config", str(cfg), "--num_sample", "2"]) == 2
    assert "did you mean --num_samples" in capsys.readouterr().err
