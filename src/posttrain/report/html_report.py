"""report.html: one self-contained page per run or pipeline (PNG plots embedded as base64, inline
CSS, no scripts, no external assets), rebuilt at any time from the run's files.

    build_report(run_dir)                          -> run_dir/report.html
    build_pipeline_report(pipeline_dir, stage_dirs) -> pipeline_dir/report.html, a section per stage

Sections, each present only when its data is: summary, training curves (per metric family,
:mod:`posttrain.report.plots`), held-out evaluation (eval.json: metrics of the model and the
baseline, win rate, KL, a chart, generations before (baseline) and after (model) side by side;
eval_results.json: the recipe's final held-out metrics), and the resolved config.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.report.run_files import (
    CONFIG_FILE,
    EVAL_CONFIG_FILE,
    METRICS_FILE,
    REPORT_FILE,
    RUN_FILES,
    RunFiles,
    is_finite_number,
    read_run,
)

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 1.5em 2em; color: #222; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
h3 { margin-top: 1.2em; } .meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.samples td { max-width: 420px; white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, monospace;
                   font-size: 0.85em; }
img { max-width: 100%; height: auto; display: block; margin: 0.6em 0; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.plots { display: flex; flex-wrap: wrap; gap: 0.8em; align-items: flex-start; }
figure.family { margin: 0; } figure.family img { margin: 0; }
figcaption { font-size: 0.8em; color: #666; max-width: 400px; }
.good { color: #1a7f37; } .bad { color: #cf222e; } nav a { margin-right: 1em; }
"""


class ReportError(PosttrainError):
    """A directory that holds no run (no metrics.jsonl, eval.json, ... here or in subdirectories)."""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _key_value_table(values: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td class='num'>{_e(_fmt(v))}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>"


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def method_of(config: dict[str, Any]) -> str | None:
    """The method whose config class has exactly these keys (config.yaml does not name it); its
    name is the last part of the class's default output_dir (runs/sft, runs/online-dpo, ...)."""
    import dataclasses

    from posttrain import config as configs

    if not config:
        return None
    found = []
    for cls in vars(configs).values():
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__name__.endswith("Config"):
            fields = {f.name: f for f in dataclasses.fields(cls)}
            default = fields["output_dir"].default if "output_dir" in fields else None
            if isinstance(default, str) and set(fields) == set(config):
                found.append(Path(default).name)
    return " / ".join(sorted(found)) or None


# ---------------------------------------------------------------------------- sections


def _summary_section(run: RunFiles) -> str:
    parts = []
    if run.summary:
        parts.append(_key_value_table(_flatten(run.summary)))
    last = {k: points[-1][1] for k, points in run.series.items() if points and not k.startswith("eval/")}
    if last:
        parts.append("<h3>Last logged values</h3>" + _key_value_table(last))
    return "<h2>Summary</h2>" + "".join(parts) if parts else ""


def _curves_section(run: RunFiles) -> str:
    from posttrain.report.plots import training_plots

    if not run.series:
        return ""
    steps = max(s for points in run.series.values() for s, _ in points)
    out = [f"<h2>Training curves</h2><p class='meta'>{_e(METRICS_FILE)}: {len(run.series)} metrics up to "
           f"step {steps}; held-out (eval/) values are drawn as red squares.</p>"]
    figures = [f"<figure class='family'>{_img(plot.png, f'{plot.title}: ' + ', '.join(plot.metrics))}"
               f"<figcaption>{_e(plot.title)}: {_e(', '.join(plot.metrics))}</figcaption></figure>"
               for plot in training_plots(run.series)]
    return "".join(out) + "<div class='plots'>" + "".join(figures) + "</div>"


def _metrics_table(metrics: dict[str, dict[str, Any]]) -> str:
    models = list(metrics)
    names = list(dict.fromkeys(k for m in metrics.values() for k in m))
    head = "<tr><th>metric</th>" + "".join(f"<th>{_e(m)}</th>" for m in models) + "</tr>"
    rows = "".join("<tr><th>" + _e(n) + "</th>" + "".join(
        f"<td class='num'>{_e(_fmt(metrics[m].get(n)))}</td>" for m in models) + "</tr>" for n in names)
    return f"<table>{head}{rows}</table>"


def _mark(correct: Any) -> str:
    if correct is True:
        return " <span class='good'>✓ correct</span>"
    if correct is False:
        return " <span class='bad'>✗ wrong</span>"
    return ""


def _shown(text: Any) -> str:
    """A completion as text; whitespace-only ones (a random model's) are shown quoted, not as a blank."""
    text = "" if text is None else str(text)
    return repr(text) if not text.strip() else text


def _samples_table(samples: list[dict], shown: int) -> str:
    if not samples:
        return ""
    has_baseline = any("baseline" in s for s in samples)
    head = "<tr><th>#</th><th>prompt</th><th>answer</th>"
    head += ("<th>before (baseline)</th>" if has_baseline else "") + "<th>after (model)</th></tr>"
    rows = []
    for s in samples[:shown]:
        cells = [f"<td class='num'>{_e(s.get('row', ''))}</td>", f"<td>{_e(s.get('prompt', ''))}</td>",
                 f"<td>{_e(_fmt(s.get('answer')))}</td>"]
        for who in (["baseline"] if has_baseline else []) + ["model"]:
            reward = s.get(f"{who}_reward")
            note = (f"<br><span class='meta'>reward {_e(_fmt(reward))}</span>" if reward is not None else "")
            cells.append(f"<td>{_e(_shown(s.get(who)))}{note}{_mark(s.get(f'{who}_correct'))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    mode = samples[0].get("mode", "greedy")
    return (f"<h3>Sample generations ({_e(mode)}; {min(shown, len(samples))} of {len(samples)} prompts)</h3>"
            f"<table class='samples'>{head}{''.join(rows)}</table>")


def _eval_section(run: RunFiles) -> str:
    from posttrain.report.plots import eval_chart

    out = []
    record = run.eval_record
    if record:
        metrics = record.get("metrics") or {}
        comparison = record.get("comparison") or {}
        who = f"model <b>{_e(record.get('model'))}</b>"
        if record.get("baseline"):
            who += f" against baseline <b>{_e(record.get('baseline'))}</b>"
        out.append(f"<h2>Evaluation</h2><p class='meta'>{who} on {_e(record.get('num_prompts'))} prompts of "
                   f"{_e(record.get('dataset'))}</p>")
        if metrics:
            out.append(_metrics_table(metrics))
        if comparison:
            out.append("<h3>Model vs baseline</h3>" + _key_value_table(comparison)
                       + "<p class='meta'>win rate: share of paired prompts where the model's completion scores "
                       "higher (ties count ½; judge: asked in both orders); KL: mean over the model's samples of "
                       "Σ_t log p_model − log p_baseline (k1) and of Σ_t (r − 1 − log r), r = p_baseline/p_model (k3)."
                       "</p>")
        chart = eval_chart(metrics, comparison) if metrics else None
        if chart is not None:
            out.append(_img(chart.png, "Evaluation: " + ", ".join(chart.metrics)))
        settings = record.get("settings") or {}
        out.append(_samples_table(record.get("samples") or [], int(settings.get("num_shown_samples", 8) or 8)))
        if settings:
            out.append("<h3>Eval settings</h3>" + _key_value_table(
                {k: (", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in settings.items()}))
    if run.eval_results:
        values = {k: v for k, v in _flatten(run.eval_results).items() if is_finite_number(v) or v is None}
        out.append(("" if record else "<h2>Evaluation</h2>") + "<h3>Final held-out metrics</h3>"
                   + _key_value_table(values))
    return "".join(out)


def _config_section(run: RunFiles) -> str:
    out = []
    for name, text in ((CONFIG_FILE, run.config_text), (EVAL_CONFIG_FILE, run.eval_config_text)):
        if text is not None:
            out.append(f"<p class='meta'>{_e(name)}</p><pre>{_e(text)}</pre>")
    return "<h2>Resolved config</h2>" + "".join(out) if out else ""


def _run_body(run: RunFiles) -> str:
    return "".join([_summary_section(run), _curves_section(run), _eval_section(run), _config_section(run)])


def _page(title: str, subtitle: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1><p class='meta'>{subtitle}</p>{body}"
            "</body></html>\n")


def _generated() -> str:
    return f"generated {time.strftime('%Y-%m-%d %H:%M:%S')} by posttrain"


def _write(path: Path, text: str) -> Path:
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a page
    return path


# ---------------------------------------------------------------------------- entry points


def build_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.html from the run's files and return its path."""
    run = read_run(run_dir)
    if not run.has_anything:
        raise ReportError(f"{run.run_dir}: nothing to report (no {', '.join(RUN_FILES)})")
    method = method_of(run.config) or ("eval" if run.eval_record and not run.series else None)
    title = f"posttrain {method} report" if method else "posttrain report"
    subtitle = f"{_e(run.run_dir.resolve())} · {_generated()}"
    return _write(run.run_dir / REPORT_FILE, _page(title, subtitle, _run_body(run)))


def build_pipeline_report(pipeline_dir: str | Path, stage_dirs: dict[str, Path]) -> Path:
    """Write pipeline_dir/report.html: a section per stage (its curves, eval and config), in the
    order of `stage_dirs`, plus pipeline_dir's own eval.json / metrics when it has them."""
    pipeline_dir = Path(pipeline_dir)
    sections, nav = [], []
    for i, (name, stage_dir) in enumerate(stage_dirs.items()):
        run = read_run(stage_dir)
        anchor = f"stage-{i}"
        nav.append(f"<a href='#{anchor}'>{_e(name)}</a>")
        body = _run_body(run) if run.has_anything else "<p class='meta'>no metrics or results yet</p>"
        # demote the run page's headings one level inside a stage section
        body = body.replace("<h3>", "<h4>").replace("</h3>", "</h4>").replace("<h2>", "<h3>").replace("</h2>", "</h3>")
        sections.append(f"<section id='{anchor}'><h2>Stage {i + 1}: {_e(name)}</h2>"
                        f"<p class='meta'>{_e(Path(stage_dir).resolve())}</p>{body}</section>")
    own = read_run(pipeline_dir)
    if own.has_anything:
        nav.append("<a href='#pipeline'>pipeline</a>")
        sections.append(f"<section id='pipeline'>{_run_body(own)}</section>")
    if not sections:
        raise ReportError(f"{pipeline_dir}: no stages to report")
    body = "<nav>" + "".join(nav) + "</nav>" + "".join(sections)
    subtitle = f"{_e(pipeline_dir.resolve())} · {len(stage_dirs)} stages · {_generated()}"
    return _write(pipeline_dir / REPORT_FILE, _page("posttrain pipeline report", subtitle, body))


def _is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in RUN_FILES)


def find_stage_dirs(pipeline_dir: Path) -> dict[str, Path]:
    """Subdirectories holding a run, in the order they started (their config.yaml's time)."""
    stages = [d for d in pipeline_dir.iterdir() if d.is_dir() and _is_run_dir(d)]

    def started(d: Path) -> float:
        marker = d / CONFIG_FILE
        return (marker if marker.exists() else d).stat().st_mtime

    return {d.name: d for d in sorted(stages, key=lambda d: (started(d), d.name))}


def rebuild(path: str | Path) -> Path:
    """`posttrain report DIR`: a run directory (metrics.jsonl at its top) gets build_report; a
    directory whose subdirectories are runs (a pipeline) gets build_pipeline_report."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory")
    if (path / METRICS_FILE).is_file():
        return build_report(path)
    stages = find_stage_dirs(path)
    if stages:
        return build_pipeline_report(path, stages)
    if _is_run_dir(path):
        return build_report(path)
    raise ReportError(f"{path}: no {', '.join(RUN_FILES)} here or in its subdirectories; is it a run directory?")


def write_report_safely(run_dir: str | Path, log: Callable[[str], None] = print) -> Path | None:
    """build_report, but a failure (matplotlib missing, a plotting error) is a warning: the
    report must never cost a run its model or its results."""
    try:
        return build_report(run_dir)
    except Exception as e:  # noqa: BLE001 — the report is optional output
        log(f"warning: report.html not written ({type(e).__name__}: {e}); rebuild it with `posttrain report {run_dir}`")
        return None
