"""Figures a run logs: the misclassified grid shows the right images under the right labels."""

from __future__ import annotations

import io

import numpy as np

from fashion_sweep import data, plots


def test_misclassified_grid_tiles_the_first_wrong_images_under_their_labels(fashion_dir) -> None:
    dataset = data.load(fashion_dir)
    images, truth = dataset.x_test[:200].astype("float32") / 255, dataset.y_test[:200].astype(int)
    predicted = np.where(np.arange(200) % 5 == 0, (truth + 1) % 10, truth)  # every fifth image wrong: 40
    fig = plots.misclassified(images, truth, predicted, data.CLASS_NAMES)
    (ax,) = fig.axes
    labels = [text.get_text() for text in ax.texts]
    wrong = np.flatnonzero(truth != predicted)[:25]
    assert labels == [f"{data.CLASS_NAMES[truth[i]]}\n-> {data.CLASS_NAMES[predicted[i]]}" for i in wrong]
    canvas = ax.images[0].get_array()
    tile_w, tile_h = 28 + 3, 9 + 28 + 3
    for k in (0, 7, 24):  # first, inner and last tile of the 5 x 5 grid
        row, col = divmod(k, 5)
        tile = canvas[row * tile_h + 9 :][:28, col * tile_w :][:, :28]
        np.testing.assert_array_equal(tile, images[wrong[k]].squeeze())
    assert "40 in all" in fig.get_suptitle()
    fig.savefig(io.BytesIO(), format="png")


def test_misclassified_grid_with_nothing_wrong_is_an_empty_figure(fashion_dir) -> None:
    dataset = data.load(fashion_dir)
    truth = dataset.y_test[:50].astype(int)
    fig = plots.misclassified(dataset.x_test[:50] / 255, truth, truth, data.CLASS_NAMES)
    assert len(fig.axes[0].texts) == 0 and "0 in all" in fig.get_suptitle()
    fig.savefig(io.BytesIO(), format="png")
