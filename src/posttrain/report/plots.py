"""Training curves and eval charts as PNG bytes (matplotlib, Agg; no pyplot global state).

Which plots a run gets is decided by the metric names it logged: each name goes to the first
family whose patterns match it (held-out ``eval/<name>`` goes with ``<name>``, drawn on the same
axes as markers), so SFT gets loss and token accuracy, preference methods accuracy and margins,
RL methods reward, KL and entropy — including PPO / Online DPO's ``objective/*`` names.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fnmatch import fnmatchcase

# (title, patterns). A metric belongs to the first family with a matching pattern.
FAMILIES: list[tuple[str, list[str]]] = [
    ("Loss", ["loss", "loss/*", "policy_loss", "value_loss", "loss/policy*", "loss/value*"]),
    ("Reward", ["reward", "reward_std", "rewards/*/mean", "rlhf_reward", "objective/rlhf_reward",
                "objective/scores", "scores", "score", "objective/score*"]),
    ("KL to the reference", ["kl", "objective/kl", "objective/non_score_reward", "non_score_reward"]),
    ("Entropy", ["entropy", "objective/entropy", "policy/entropy*"]),
    ("Accuracy", ["rewards/accuracies", "accuracy", "mean_token_accuracy", "*/accuracy"]),
    ("Margins and rewards of chosen / rejected", ["rewards/margins", "margin", "rewards/chosen*", "rewards/rejected*"]),
    ("Policy clipping", ["clip_ratio*", "*clipfrac*", "policy/approxkl*", "val/*"]),
    ("Completions", ["completions/*", "frac_reward_zero_std", "*eos*"]),
    ("Log-probs", ["logps/*", "logits/*"]),
    ("Optimisation", ["learning_rate", "grad_norm"]),
    ("Throughput", ["tokens_per_second"]),
    ("Other metrics", ["*"]),
]
# Bookkeeping, not worth a plot.
SKIPPED = ["epoch", "num_tokens", "elapsed_seconds", "num_loss_tokens", "num_pairs", "count/*", "rewards/*/std",
           "peak_memory*"]
MAX_PANELS = 12
EVAL_PREFIX = "eval/"


@dataclass
class Panel:
    """One subplot: a metric's training series and its held-out (eval/) series, if any."""

    name: str
    train: list[tuple[int, float]]
    held_out: list[tuple[int, float]]


@dataclass
class Plot:
    title: str
    png: bytes
    metrics: list[str]


def family_of(name: str) -> str | None:
    base = name[len(EVAL_PREFIX):] if name.startswith(EVAL_PREFIX) else name
    if any(fnmatchcase(base, p) for p in SKIPPED):
        return None
    for title, patterns in FAMILIES:
        if any(fnmatchcase(base, p) for p in patterns):
            return title
    return None


def group_panels(series: dict[str, list[tuple[int, float]]]) -> dict[str, list[Panel]]:
    """family title -> panels, in FAMILIES order; a metric and its eval/ twin share a panel."""
    panels: dict[str, dict[str, Panel]] = {}
    for name, points in series.items():
        family = family_of(name)
        if family is None or not points:
            continue
        held_out = name.startswith(EVAL_PREFIX)
        base = name[len(EVAL_PREFIX):] if held_out else name
        panel = panels.setdefault(family, {}).setdefault(base, Panel(base, [], []))
        if held_out:
            panel.held_out = points
        else:
            panel.train = points
    order = [title for title, _ in FAMILIES]
    return {t: list(panels[t].values())[:MAX_PANELS] for t in order if t in panels}


def _figure(n_panels: int, width: float = 4.4, height: float = 3.0, bottom: float = 0.5):
    """A grid of up to 3 panels a row, each `width` x `height` inches. Margins are fixed in inches
    (constrained layout would cost half the rendering time of a report)."""
    from matplotlib.figure import Figure

    cols = min(3, n_panels)
    rows = -(-n_panels // cols)
    title = 0.35  # the family title above the grid
    fig_w, fig_h = width * cols, height * rows + title
    fig = Figure(figsize=(fig_w, fig_h), dpi=90)
    # per panel: 0.65 in left for tick labels, 0.15 in right, `bottom` for the x label, 0.35 in for its title
    fig.subplots_adjust(left=0.65 / fig_w, right=1 - 0.15 / fig_w, bottom=bottom / fig_h, top=1 - (title + 0.35) / fig_h,
                        wspace=0.8 / (width - 0.8), hspace=(bottom + 0.35) / (height - bottom - 0.35))
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_family(title: str, panels: list[Panel]) -> Plot:
    fig, axes = _figure(len(panels))
    for ax, panel in zip(axes, panels):
        if panel.train:
            steps, values = zip(*panel.train)
            ax.plot(steps, values, color="#1f77b4", linewidth=1.6, marker="o" if len(steps) < 3 else None,
                    markersize=4, label="train")
        if panel.held_out:
            steps, values = zip(*panel.held_out)
            ax.plot(steps, values, color="#d62728", linestyle="--", marker="s", markersize=5, label="held-out")
        ax.set_title(panel.name, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if panel.train and panel.held_out:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=12, y=1 - 0.05 / fig.get_figheight())
    return Plot(title, _png(fig), [p.name for p in panels])


def training_plots(series: dict[str, list[tuple[int, float]]]) -> list[Plot]:
    return [plot_family(title, panels) for title, panels in group_panels(series).items()]


def eval_chart(metrics: dict[str, dict[str, float | None]], comparison: dict[str, float | None]) -> Plot | None:
    """Grouped bars of the eval metrics on a common scale: reward, accuracy, pass@k per mode
    for each model, and the win rates (0.5 = as good as the baseline)."""
    keys = [k for k in dict.fromkeys(k for m in metrics.values() for k in m)
            if k.split("/", 1)[-1] in ("reward", "accuracy") or "/pass@" in k]
    win_keys = [k for k in comparison if k.endswith("/win_rate") and comparison[k] is not None]
    if not keys and not win_keys:
        return None
    fig, axes = _figure(int(bool(keys)) + int(bool(win_keys)), width=5.5, height=3.6, bottom=1.1)
    colours = {"model": "#1f77b4", "baseline": "#ff7f0e"}
    if keys:
        ax = axes[0]
        names = list(metrics)
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            values = [metrics[name].get(k) for k in keys]
            xs = [i + j * width for i in range(len(keys))]
            ax.bar(xs, [v if v is not None else 0.0 for v in values], width=width, label=name,
                   color=colours.get(name, None))
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(keys))])
        ax.set_xticklabels(keys, rotation=20, ha="right", fontsize=8)
        ax.set_title("model vs baseline", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    if win_keys:
        ax = axes[-1]
        ax.bar(range(len(win_keys)), [comparison[k] for k in win_keys], color="#2ca02c")
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1)
        ax.set_xticks(range(len(win_keys)))
        ax.set_xticklabels(win_keys, fontsize=8)
        ax.set_title("win rate of the model over the baseline", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Evaluation", fontsize=12, y=1 - 0.05 / fig.get_figheight())
    return Plot("Evaluation", _png(fig), keys + win_keys)
