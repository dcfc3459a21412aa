"""Figures: training curves, confusion matrix, misclassified images, and a sweep's learning-rate plots.

Owns how results look; every function takes plain numbers and returns a matplotlib Figure, writing nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def curves(history: Mapping[str, Sequence[float]]) -> Figure:
    """Training vs validation loss and accuracy per epoch (the reference's "Training & Validation graph")."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        epochs = np.arange(1, len(history[metric]) + 1)
        ax.plot(epochs, history[metric], "o-", label=f"training {metric}")
        ax.plot(epochs, history[f"val_{metric}"], "s-", label=f"validation {metric}")
        ax.set(xlabel="epoch", ylabel=metric, title=f"Training & validation {metric}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Counts of true class (rows) against predicted class (columns) on the test set."""
    n = len(class_names)
    counts = np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n)
    fig = Figure(figsize=(8, 7), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title=f"Confusion matrix (test accuracy {np.trace(counts) / counts.sum():.2%})",
    )
    for i in range(n):
        for j in range(n):
            color = "white" if counts[i, j] > counts.max() / 2 else "black"
            ax.text(j, i, counts[i, j], ha="center", va="center", fontsize=7, color=color)
    return fig


def misclassified(
    images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str], count: int = 25
) -> Figure:
    """A grid of the first `count` misclassified test images, titled "true -> predicted"."""
    wrong = np.flatnonzero(y_true != y_pred)[:count]
    side = max(1, int(np.ceil(np.sqrt(len(wrong)))))
    # A fixed layout: "constrained" made this figure 2.5x slower to save (1.2 s vs 0.5 s, matplotlib 3.11).
    height = 2.2 * side + 0.6  # inches: 0.6 for the title
    fig = Figure(figsize=(max(6, 2 * side), height))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.8 / height, hspace=0.45)
    axes = np.atleast_1d(fig.subplots(side, side)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, wrong, strict=False):
        ax.imshow(images[i].squeeze(), cmap="gray_r")
        ax.set_title(f"{class_names[y_true[i]]}\n-> {class_names[y_pred[i]]}", fontsize=8)
    fig.suptitle(f"Misclassified test images ({len(np.flatnonzero(y_true != y_pred))} in all; true -> predicted)")
    return fig


def lr_effect(
    series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]], best_lr: float | None
) -> Figure:
    """Final training and validation loss against learning rate (the reference's "Effect of a learning rate").

    series maps a label (e.g. the optimizer) to (learning rates, final training losses, final validation
    losses); a non-finite loss (a diverged run) is drawn as an x at the top of the axes.
    """
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    finite = [v for lrs, train, val in series.values() for v in (*train, *val) if np.isfinite(v)]
    ceiling = max(finite, default=1.0) * 1.15
    for label, (lrs, train, val) in series.items():
        prefix = f"{label}: " if label else ""
        for losses, style, name in ((train, "o-", "training"), (val, "s--", "validation")):
            y = np.asarray(losses, dtype=float)
            (line,) = ax.plot(lrs, np.where(np.isfinite(y), y, np.nan), style, label=f"{prefix}final {name} loss")
            diverged = ~np.isfinite(y)
            if diverged.any():
                ax.plot(np.asarray(lrs)[diverged], [ceiling] * diverged.sum(), "x", color=line.get_color(), ms=10)
    if best_lr is not None:
        ax.axvline(best_lr, color="green", alpha=0.5, lw=3, label=f"best lr = {best_lr:g} (lowest val_loss)")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="loss", title="Effect of the learning rate (x = diverged)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def val_curves(histories: Mapping[str, Mapping[str, Sequence[float]]]) -> Figure:
    """Validation loss and accuracy per epoch, one line per run (labelled by its swept values)."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("val_loss", "val_accuracy"), strict=True):
        for label, history in histories.items():
            values = history.get(metric, [])
            ax.plot(np.arange(1, len(values) + 1), values, "o-", ms=3, label=label)
        ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    return fig
