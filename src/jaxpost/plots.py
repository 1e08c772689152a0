"""Training curves of a run: reward (total and per reward function), KL, loss and
completion length by step, and the SFT warm-up's loss; for a DPO run, its loss, implicit
reward margin and share of pairs ranked right.

Read from the run directory's ``metrics.jsonl`` (:func:`jaxpost.train.read_metrics`), so
they can be drawn during a run, after it, or in a new session. Drawn with matplotlib's
object API on the Agg canvas: no pyplot state, and no change to the notebook's backend.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxpost.runtime.atomic import atomic_file
from jaxpost.train import METRICS_FILE, read_metrics

PLOT_FILE = "training_curves.png"
# (metric in metrics.jsonl, panel title); the reward panel also draws every
# ``rewards/<function>`` metric of the run.
CURVES = (
    ("reward", "mean reward (total and per function)"),
    ("kl", "KL to the reference"),
    ("loss", "GRPO loss"),
    ("completion_length", "completion length (tokens)"),
    ("sft/loss", "SFT warm-up loss (by its own steps)"),
)
# A DPO run's panels (jaxpost.dpo): no rollouts, so no reward, KL or length.
DPO_CURVES = (
    ("dpo/rewards/margin", "DPO implicit reward margin (chosen - rejected)"),
    ("dpo/rewards/accuracy", "DPO pairs ranked right"),
    ("dpo/loss", "DPO loss"),
    ("sft/loss", "SFT warm-up loss (by its own steps)"),
)


def training_figure(output_dir: str | os.PathLike) -> Figure:
    """A 2x3 figure of the run's curves; a metric never logged says so in its panel.

    The reward panel draws the total reward and, with a legend, each reward function's
    batch mean (``rewards/<name>`` in ``metrics.jsonl``, weights applied).

    Raises:
      FileNotFoundError: the run directory has no metrics yet.
    """
    rows = read_metrics(output_dir)
    if not rows:
        raise FileNotFoundError(f"{Path(output_dir) / METRICS_FILE} holds no metrics: train "
                                "first (train_grpo or run_full_pipeline with this output_dir)")
    fig = Figure(figsize=(14, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    dpo = any("dpo/loss" in r for r in rows)
    curves = DPO_CURVES if dpo else CURVES
    per_reward = sorted({k for r in rows for k in r if k.startswith("rewards/")})
    axes = fig.subplots(2, 3).flat
    for ax in axes[len(curves):]:
        ax.set_axis_off()
    for ax, (name, title) in zip(axes, curves):
        ax.set_title(title)
        ax.set_xlabel("step")
        # The total last, in black on top: it often equals one function's curve.
        names = [*per_reward, name] if name == "reward" else [name]
        drawn = 0
        for curve in names:
            points = [(r["step"], r[curve]) for r in rows if curve in r]
            if points:
                steps, values = zip(*points)
                label = "total" if curve == "reward" else curve.removeprefix("rewards/")
                style = ({"color": "black", "linewidth": 1.5, "linestyle": "--", "zorder": 3}
                         if curve == "reward" and per_reward else {})
                ax.plot(steps, values, marker="o", markersize=3, label=label, **style)
                drawn += 1
        if drawn == 0:
            ax.text(0.5, 0.5, f"'{name}' not logged", ha="center", va="center",
                    transform=ax.transAxes)
        elif len(names) > 1:
            ax.legend(fontsize="small")
    sft_steps = sum("sft/loss" in r for r in rows)
    main_steps = sum(any(k != "step" and not k.startswith("sft/") for k in r) for r in rows)
    stages = [f"{sft_steps} SFT steps"] if sft_steps else []
    stages.append(f"{main_steps} {'DPO' if dpo else 'GRPO'} steps")
    fig.suptitle(f"{Path(output_dir).name}: {', '.join(stages)}")
    return fig


def plot_training_curves(output_dir: str | os.PathLike, path: str | os.PathLike | None = None
                         ) -> Path:
    """Writes the curves as a PNG (default ``<output_dir>/training_curves.png``), atomically.

    Raises:
      FileNotFoundError: the run directory has no metrics yet.
    """
    path = Path(path) if path is not None else Path(output_dir) / PLOT_FILE
    figure = training_figure(output_dir)
    with atomic_file(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    return path


def show_training_curves(output_dir: str | os.PathLike):
    """Writes the PNG and returns it as an image a notebook displays.

    Returns:
      An ``IPython.display.Image`` (displayed when it is a cell's last value), or the
      PNG's path when IPython is not installed.
    """
    path = plot_training_curves(output_dir)
    try:
        # IPython exists only in a notebook
        from IPython.display import Image
    except ImportError:
        return path
    return Image(filename=str(path))
