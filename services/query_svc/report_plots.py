"""The report's figures, drawn with matplotlib (Agg) as inline SVG strings, and the statistics
they show: the layer-bin shares and the power-law fit of the score distribution's tail."""

from __future__ import annotations

import io
import itertools
import re
from dataclasses import dataclass

import numpy as np

LAYER_BINS = 9  # the paper's layer-wise bar chart: layers in 9 consecutive bins, bottom to top


def _figure(width: float, height: float):
    """A new figure and its axes. matplotlib's object API, not pyplot: no global figure state, so
    workers may draw on several threads at once."""
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: smaller, selectable, no glyph defs
    # ids from a fixed salt and the content (not a random one): the same result gives the same bytes
    matplotlib.rcParams["svg.hashsalt"] = "influence-report"
    figure = Figure(figsize=(width, height))
    return figure, figure.subplots()


def to_svg(figure) -> str:
    """The figure as an <svg> element at its natural size, shrunk to its container when narrower
    (class "figure"; text kept as text, ids unique per figure so figures can share one page)."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})  # reproducible bytes
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    return re.sub(r"<svg\b", '<svg class="figure"', svg, count=1)


# -- layers -----------------------------------------------------------------------------------


def layer_bin_shares(layer_scores: list[np.ndarray], bins: int = LAYER_BINS) -> np.ndarray:
    """Average share of influence per layer bin over queries: [min(bins, L)], sums to 1.

    layer_scores: per query an [L, k] array (rows bottom to top). A query's share of layer l is
    Σ_s |S[l, s]| / Σ_l Σ_s |S[l, s]| over its top-k sequences s; layers go into `bins`
    consecutive bins of (nearly) equal size; queries with no influence at all are skipped."""
    n_layers = layer_scores[0].shape[0]
    bins = min(bins, n_layers)
    bin_of = (np.arange(n_layers) * bins) // n_layers
    shares = []
    for scores in layer_scores:
        weight = np.abs(scores).sum(axis=1)
        if weight.sum() > 0:
            shares.append(np.bincount(bin_of, weights=weight / weight.sum(), minlength=bins))
    return np.mean(shares, axis=0) if shares else np.zeros(bins)


def layer_heatmap(labels: list[str], scores: np.ndarray, columns: list[str]) -> str:
    """Influence per layer (rows, bottom to top) x top sequence (columns), red + / blue -."""
    rows, width = scores.shape
    figure, axes = _figure(min(1.6 + 0.55 * width, 9.0), min(1.2 + 0.32 * rows, 6.0))
    limit = float(np.abs(scores).max()) or 1.0
    image = axes.imshow(scores, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", origin="lower")
    axes.set_yticks(range(rows), labels, fontsize=7)
    axes.set_xticks(range(width), columns, fontsize=7, rotation=45, ha="right")
    axes.set_xlabel("top sequences (by rank)", fontsize=8)
    colorbar = figure.colorbar(image, ax=axes, fraction=0.05)
    colorbar.ax.tick_params(labelsize=7)
    return to_svg(figure)


def layer_bin_chart(shares: np.ndarray, n_layers: int) -> str:
    figure, axes = _figure(6.0, 2.8)
    bins = len(shares)
    edges = [(b * n_layers + bins - 1) // bins for b in range(bins + 1)]
    labels = [f"{edges[b]}–{edges[b + 1] - 1}" if edges[b + 1] - 1 > edges[b] else f"{edges[b]}" for b in range(bins)]
    axes.bar(range(bins), shares, color="#4c72b0")
    axes.set_xticks(range(bins), labels, fontsize=8)
    axes.set_xlabel("layer bin (bottom to top)", fontsize=9)
    axes.set_ylabel("share of influence", fontsize=9)
    axes.set_ylim(0, max(float(shares.max()) * 1.15, 0.05))
    return to_svg(figure)


# -- the distribution ---------------------------------------------------------------------------


@dataclass
class PowerLawTail:
    """p(x) ∝ x^-alpha for x >= x_min, fitted to the top `tail` of `n` positive scores (Hill's
    maximum-likelihood estimate); the 1 - CDF then falls with slope 1 - alpha on log-log axes."""

    alpha: float
    x_min: float
    tail: int
    n: int


MIN_TAIL = 5


def fit_power_law(values: np.ndarray, tail_fraction: float = 0.2) -> PowerLawTail | None:
    """Fit the tail of the positive values, or None with fewer than MIN_TAIL of them in it."""
    positive = np.sort(values[values > 0])[::-1]
    tail = max(MIN_TAIL, int(len(positive) * tail_fraction))
    if len(positive) < tail or tail < MIN_TAIL:
        return None
    top = positive[:tail]
    x_min = float(top[-1])
    logs = np.log(top / x_min)
    if logs.sum() <= 0:
        return None
    return PowerLawTail(alpha=1.0 + tail / float(logs.sum()), x_min=x_min, tail=tail, n=len(positive))


def ccdf_points(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positive values ascending and 1 - CDF at each (P[X >= x], so > 0 on log axes)."""
    positive = np.sort(values[values > 0])
    return positive, (len(positive) - np.arange(len(positive))) / len(positive)


def ccdf_chart(curves: list[tuple[str, np.ndarray]], fits: list[PowerLawTail | None]) -> str:
    """1 - CDF of each curve's positive values on log-log axes, its fitted tail dashed."""
    import matplotlib

    figure, axes = _figure(6.4, 3.6)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, values), fit, color in zip(curves, fits, itertools.cycle(colors), strict=False):
        x, y = ccdf_points(values)
        if not len(x):
            continue
        name = label if fit is None else f"{label} (α = {fit.alpha:.2f})"
        axes.step(x, y, where="post", color=color, linewidth=1.2, label=name)
        if fit is not None:
            xs = np.geomspace(fit.x_min, float(x.max()), 20)
            axes.plot(xs, (fit.tail / fit.n) * (xs / fit.x_min) ** (1 - fit.alpha), "--", color=color, linewidth=1)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("influence score (positive scores)", fontsize=9)
    axes.set_ylabel("1 - CDF", fontsize=9)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7, loc="lower left")
    return to_svg(figure)
