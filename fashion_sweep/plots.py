"""Figures: training curves, confusion matrix, misclassified images, and a sweep's learning-rate plots.

Owns how results look; every function takes plain numbers and returns a matplotlib Figure, writing nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def curves(history: Mapping[str, Sequence[float]]) -> Figure:
    """Training vs validation loss and accuracy per epoch (the reference's "Training & Validation graph")."""
    fig = Figure(figsize=(10, 4))  # a fixed layout: "constrained" took 0.1-0.2 s more to save per figure
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.22)
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
    fig = Figure(figsize=(8, 7))  # a fixed layout, as in curves()
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.17, top=0.95)
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
    """A grid of the first `count` misclassified test images, each labelled "true -> predicted".

    The grid is one image on one axes (a tile per image, room for its label above it): 25 axes made this
    figure take 0.5-0.6 s to build and save, the mosaic 0.15 s (matplotlib 3.11).
    """
    wrong = np.flatnonzero(y_true != y_pred)[:count]
    side = max(1, int(np.ceil(np.sqrt(len(wrong)))))
    label, gap, size = 9, 3, images.shape[1]  # pixels: room for the label above a tile, between tiles, a tile
    tile_w, tile_h = size + gap, label + size + gap
    canvas = np.zeros((side * tile_h, side * tile_w))
    for k, i in enumerate(wrong):
        row, col = divmod(k, side)
        canvas[row * tile_h + label :][:size, col * tile_w :][:, :size] = images[i].squeeze()
    inches = 2 / tile_w  # per canvas pixel: each tile 2 inches wide
    fig = Figure(figsize=(canvas.shape[1] * inches, canvas.shape[0] * inches + 0.6))
    ax = fig.add_axes((0, 0, 1, canvas.shape[0] * inches / fig.get_figheight()))
    ax.imshow(canvas, cmap="gray_r", interpolation="nearest", aspect="auto")
    ax.axis("off")
    for k, i in enumerate(wrong):
        row, col = divmod(k, side)
        text = f"{class_names[y_true[i]]}\n-> {class_names[y_pred[i]]}"
        ax.text(col * tile_w + size / 2, row * tile_h + label - 0.5, text, fontsize=8, ha="center", va="bottom")
    fig.suptitle(f"Misclassified test images ({len(np.flatnonzero(y_true != y_pred))} in all; true -> predicted)")
    return fig


def lr_effect(
    series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    best_lr: float | None,
    spread: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    pruned: Mapping[str, Sequence[tuple[float, float, float, int]]] | None = None,
    control: tuple[str, float, float, float] | None = None,
) -> Figure:
    """Final training and validation loss against learning rate (the reference's "Effect of a learning rate").

    series maps a label (e.g. the optimizer) to (learning rates, final training losses, final validation
    losses); a non-finite loss (a diverged run) is drawn as an x at the top of the axes. spread, if given, holds
    the standard deviations (over seeds) of those losses, drawn as error bars. pruned maps a label to runs stopped
    early at a rung, (learning rate, last training loss, last validation loss, epochs), drawn as hollow markers.
    control, if given, is a run beside the grid, (label, its learning rate, final training loss, final validation
    loss): its validation loss a horizontal line across the grid (what it reached without choosing a rate), both
    losses stars at its own rate.
    """
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    pruned = pruned or {}
    finite = [v for lrs, train, val in series.values() for v in (*train, *val) if np.isfinite(v)]
    finite += [v for points in pruned.values() for _, train, val, _ in points for v in (train, val) if np.isfinite(v)]
    ceiling = max(finite, default=1.0) * 1.15
    over_seeds = " (mean over seeds)" if spread else ""
    for label in [*series, *(label for label in pruned if label not in series)]:
        prefix = f"{label}: " if label else ""
        lrs, *losses = series.get(label, ([], [], []))
        errors = (spread or {}).get(label)
        for i, (marker, line_style, name) in enumerate((("o", "-", "training"), ("s", "--", "validation"))):
            y = np.asarray(losses[i], dtype=float)
            shown = np.where(np.isfinite(y), y, np.nan)
            what = f"final {name} loss{over_seeds}" if lrs else f"{name} loss of pruned runs"
            (line,) = ax.plot(lrs, shown, marker + line_style, label=prefix + what)
            color = line.get_color()
            if errors is not None:
                yerr = np.nan_to_num(np.asarray(errors[i], dtype=float))
                ax.errorbar(lrs, shown, yerr=yerr, fmt="none", ecolor=color, capsize=3)
            diverged = ~np.isfinite(y)
            if diverged.any():
                ax.plot(np.asarray(lrs)[diverged], [ceiling] * diverged.sum(), "x", color=color, ms=10)
            for lr, *last, epochs in pruned.get(label, []):
                ax.plot(lr, last[i], marker, mfc="none", color=color, ms=9)
                ax.annotate(str(epochs), (lr, last[i]), textcoords="offset points", xytext=(6, -3), fontsize=7)
    if any(pruned.values()):
        ax.plot([], [], "o", mfc="none", color="gray", label="pruned at epoch k (hollow marker, k next to it)")
    if control is not None and np.isfinite(control[3]):  # a diverged control is its row's status, not a line
        label, lr, train, val = control
        ax.axhline(val, color="purple", ls=":", lw=2, label=f"{label}: final validation loss{over_seeds}")
        ax.plot([lr, lr], [train, val], "*", color="purple", ms=12, label=f"{label}: final training, validation loss")
    if best_lr is not None:
        lowest = "lowest mean val_loss" if spread else "lowest val_loss"
        ax.axvline(best_lr, color="green", alpha=0.5, lw=3, label=f"best lr = {best_lr:g} ({lowest})")
    ax.set_xscale("log")
    bars = "; bars = ±1 std over seeds" if spread else ""
    ax.set(xlabel="learning rate", ylabel="loss", title=f"Effect of the learning rate (x = diverged{bars})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def val_curves(
    histories: Mapping[str, Mapping[str, Sequence[float]]], faded: Collection[str] = (), rungs: Sequence[int] = ()
) -> Figure:
    """Validation loss and accuracy per epoch, one line per run (labelled by its swept values); runs whose label
    is in faded (pruned runs) dashed and faded, and the rungs of a halving sweep as dotted vertical lines."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("val_loss", "val_accuracy"), strict=True):
        for label, history in histories.items():
            values = history.get(metric, [])
            style = {"ls": "--", "alpha": 0.5} if label in faded else {"ls": "-"}
            ax.plot(np.arange(1, len(values) + 1), values, marker="o", ms=3, label=label, **style)
        for i, rung in enumerate(rungs):
            ax.axvline(rung, color="gray", ls=":", lw=1, label="halving rungs" if i == 0 else None)
        ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    return fig


def lr_find(
    lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], min_loss_lr: float, suggested_lr: float
) -> Figure:
    """An LR range test: the smoothed (and, faintly, the raw) training loss per batch against its learning rate,
    on a log axis, with the lowest smoothed loss and the suggested learning rate (a tenth of its lr) marked."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot(lrs, losses, color="grey", alpha=0.35, lw=1, label="training loss per batch")
    ax.plot(lrs, smoothed, lw=2, label="smoothed training loss")
    ax.axvline(min_loss_lr, color="red", ls=":", label=f"lowest smoothed loss at lr = {min_loss_lr:.2g}")
    ax.axvline(suggested_lr, color="green", alpha=0.5, lw=3, label=f"suggested lr = {suggested_lr:.2g} (that / 10)")
    finite = [v for v in (*smoothed, *losses) if np.isfinite(v)]
    low, high = min(finite, default=0.0), min(max(finite, default=0.0), 1.5 * smoothed[0] if finite else 0.0)
    if high > low:  # up to 1.5x the first loss: the blow-up at the end would flatten the dip before it
        ax.set_ylim(low - 0.1 * (high - low), high + 0.05 * (high - low))
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (log scale)", ylabel="training loss", title="LR range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig
