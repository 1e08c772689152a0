"""Training curves of a run: reward, KL, loss and completion length by step.

Read from the run directory's ``metrics.jsonl`` (:func:`jaxpost.train.read_metrics`), so
they can be drawn during a run, after it, or in a new session. Drawn with matplotlib's
object API on the Agg canvas: no pyplot state, and no change to the notebook's backend.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PLOT_FILE = "training_curves.png"
# (metric in metrics.jsonl, panel title)
CURVES = (
    ("reward", "mean reward"),
    ("kl", "KL to the reference"),
    ("loss", "GRPO loss"),
    ("completion_length", "completion length (tokens)"),
)


def training_figure(output_dir: str | os.PathLike) -> Figure:
    """A 2x2 figure of the run's curves; a metric never logged says so in its panel.

    Raises:
      FileNotFoundError: the run directory has no metrics yet.
    """
    from jaxpost.train import METRICS_FILE, read_metrics

    rows = read_metrics(output_dir)
    if not rows:
        raise FileNotFoundError(f"{Path(output_dir) / METRICS_FILE} holds no metrics: train "
                                "first (train_grpo or run_full_pipeline with this output_dir)")
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (name, title) in zip(fig.subplots(2, 2).flat, CURVES):
        points = [(r["step"], r[name]) for r in rows if name in r]
        ax.set_title(title)
        ax.set_xlabel("step")
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3)
        else:
            ax.text(0.5, 0.5, f"'{name}' not logged", ha="center", va="center",
                    transform=ax.transAxes)
    fig.suptitle(f"{Path(output_dir).name}: {len(rows)} steps")
    return fig


def plot_training_curves(output_dir: str | os.PathLike, path: str | os.PathLike | None = None
                         ) -> Path:
    """Writes the curves as a PNG (default ``<output_dir>/training_curves.png``)."""
    path = Path(path) if path is not None else Path(output_dir) / PLOT_FILE
    training_figure(output_dir).savefig(path, dpi=100)
    return path


def show_training_curves(output_dir: str | os.PathLike):
    """Writes the PNG and returns it as an image a notebook displays.

    Returns:
      An ``IPython.display.Image`` (displayed when it is a cell's last value), or the
      PNG's path when IPython is not installed.
    """
    path = plot_training_curves(output_dir)
    try:
        from IPython.display import Image
    except ImportError:
        return path
    return Image(filename=str(path))
