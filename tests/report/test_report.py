"""report.html: built from a run's files, self-contained, plots chosen by the metrics that exist;
`posttrain report DIR`; every training run ends with one; a failing report never costs the model."""

from __future__ import annotations

import base64
import io
import json
import re

from posttrain import SFTConfig, sft
from posttrain.cli import main as cli_main
from posttrain.report.html_report import build_pipeline_report, build_report, method_of
from posttrain.report.plots import group_panels
from posttrain.report.run_files import read_run
from tests.conftest import make_tiny_llama
from tests.report.synthetic_run import write_run

IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def _images(page: str) -> dict[str, bytes]:
    return {alt: base64.b64decode(data) for alt, data in IMG.findall(page)}


def test_report_from_a_run_directory_is_self_contained_with_a_plot_per_family(tmp_path):
    run_dir = write_run(tmp_path / "grpo-run")
    path = build_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text()
    images = _images(page)
    families = [alt.split(":")[0] for alt in images]
    assert families == ["Loss", "Reward", "KL to the reference", "Entropy", "Accuracy",
                        "Margins and rewards of chosen / rejected", "Policy clipping", "Completions",
                        "Optimisation", "Throughput", "Evaluation"]
    from PIL import Image

    for alt, png in images.items():
        assert png.startswith(b"\x89PNG\r\n\x1a\n"), alt
        width, height = Image.open(io.BytesIO(png)).size
        assert width > 100 and height > 100, alt
    # no scripts and nothing fetched from elsewhere
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert not re.search(r'src="(?!data:)', page) and "<link" not in page
    # bookkeeping is not plotted; eval/ values share the panel of their training metric
    assert "Loss: loss" in page and "num_tokens" not in "".join(images)
    assert "posttrain grpo / rloo report" in page  # GRPO and RLOO share their config keys
    # summary, the eval table (both models), the comparison, the samples before/after, the config
    assert "train_seconds" in page and "12.5" in page
    assert "<th>greedy/accuracy</th><td class='num'>0.625</td><td class='num'>0.125</td>" in page
    assert "greedy/win_rate" in page and "0.8125" in page and "sampled/kl_k3" in page
    assert "before (baseline)" in page and "after (model)" in page and "✓ correct" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page  # escaped
    assert "&#x27;   &#x27;" in page  # a blank completion is shown quoted
    assert "Final held-out metrics" in page
    assert "beta: 0.04" in page and "Resolved config" in page


def test_plots_are_chosen_by_the_metrics_present():
    def families(*names):
        return list(group_panels({n: [(1, 1.0), (2, 0.5)] for n in names}))

    sft_names = ("loss", "learning_rate", "grad_norm", "mean_token_accuracy", "num_tokens", "epoch")
    assert families(*sft_names) == ["Loss", "Accuracy", "Optimisation"]
    # PPO / Online DPO name their RL metrics objective/*
    assert families("loss", "objective/kl", "objective/entropy", "objective/rlhf_reward", "val/clipfrac") == [
        "Loss", "Reward", "KL to the reference", "Entropy", "Policy clipping"]
    assert families("loss", "accuracy", "margin", "rewards/chosen_mean") == [
        "Loss", "Accuracy", "Margins and rewards of chosen / rejected"]
    assert families("something_new") == ["Other metrics"]
    panels = group_panels({"loss": [(1, 1.0)], "eval/loss": [(0, 2.0), (1, 0.5)]})["Loss"]
    assert len(panels) == 1 and panels[0].train == [(1, 1.0)] and panels[0].held_out == [(0, 2.0), (1, 0.5)]


def test_metrics_log_with_non_finite_values_and_a_cut_line_is_read(tmp_path):
    run = read_run(write_run(tmp_path / "run", steps=3, with_eval=False))
    loss = run.series["loss"]
    assert [s for s, _ in loss] == [1, 2, 3, 4] and loss[-1][1] != loss[-1][1]  # "nan" -> NaN; step 99 cut
    assert run.eval_record is None and method_of(run.config) == "grpo / rloo"


def test_posttrain_report_command_rebuilds_a_run_and_a_pipeline(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", steps=4, with_eval=False)
    assert cli_main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").exists() and str(run_dir / "report.html") in capsys.readouterr().out
    # a directory of runs is a pipeline: a section per stage, in the order they started
    pipe = tmp_path / "pipe"
    write_run(pipe / "a-sft", steps=3, with_eval=False)
    write_run(pipe / "b-grpo", steps=3, with_eval=True)
    assert cli_main(["report", str(pipe)]) == 0
    page = (pipe / "report.html").read_text()
    assert "posttrain pipeline report" in page
    assert page.index("Stage 1: a-sft") < page.index("Stage 2: b-grpo") < page.index("before (baseline)")
    assert cli_main(["report", str(tmp_path / "missing")]) == 1
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["report", str(tmp_path / "empty")]) == 1
    assert "is it a run directory?" in capsys.readouterr().err


def test_build_pipeline_report_takes_named_stages(tmp_path):
    sft_dir = write_run(tmp_path / "p" / "stage-sft", steps=3, with_eval=False)
    eval_dir = tmp_path / "p" / "stage-eval"
    eval_dir.mkdir()
    (eval_dir / "eval.json").write_text((write_run(tmp_path / "src", steps=2) / "eval.json").read_text())
    path = build_pipeline_report(tmp_path / "p", {"sft": sft_dir, "eval": eval_dir})
    page = path.read_text()
    assert path == tmp_path / "p" / "report.html"
    assert "Stage 1: sft" in page and "Stage 2: eval" in page and "<h3>Evaluation</h3>" in page
    assert page.count("data:image/png;base64,") >= 4


def _tiny_sft(tmp_path, tokenizer, name):
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(8)]
    config = SFTConfig(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=4,
                       logging_steps=1, save_steps=0, disable_tqdm=True, learning_rate=1e-3)
    return sft(config, model=make_tiny_llama(hidden_size=16), tokenizer=tokenizer, dataset=rows)


def test_a_training_run_ends_with_its_report(tmp_path, tokenizer):
    _tiny_sft(tmp_path, tokenizer, "sft")
    page = (tmp_path / "sft" / "report.html").read_text()
    assert "posttrain sft report" in page and "Loss: loss" in page and "data:image/png;base64," in page
    assert "first_loss" in page and "max_steps: 2" in page


def test_a_failing_report_warns_and_keeps_the_model(tmp_path, tokenizer, monkeypatch, capsys):
    import posttrain.report.html_report as html_report

    def broken(run_dir):
        raise RuntimeError("no plotting today")

    monkeypatch.setattr(html_report, "build_report", broken)
    _tiny_sft(tmp_path, tokenizer, "sft-broken")
    out = tmp_path / "sft-broken"
    assert (out / "model.safetensors").exists() and (out / "run_summary.json").exists()
    assert not (out / "report.html").exists()
    assert "warning: report.html not written (RuntimeError: no plotting today)" in capsys.readouterr().out
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 2
