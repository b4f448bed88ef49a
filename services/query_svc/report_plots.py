"""The report's figures, drawn with matplotlib (Agg) as inline SVG strings, and the statistics
they show: the layer-bin shares and the power-law fit of the score distribution's tail."""

from __future__ import annotations

import io
import itertools
import re
import warnings
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


def layer_bin_share(scores: np.ndarray, bins: int = LAYER_BINS) -> np.ndarray | None:
    """One query's share of influence per layer bin: [min(bins, L)], sums to 1 (None: no influence).

    scores: [L, k] (rows bottom to top). The share of layer l is Σ_s |S[l, s]| / Σ_l Σ_s |S[l, s]|
    over its top-k sequences s; layers go into `bins` consecutive bins of (nearly) equal size."""
    n_layers = scores.shape[0]
    bins = min(bins, n_layers)
    weight = np.abs(scores).sum(axis=1)
    if not weight.sum() > 0:
        return None
    return np.bincount((np.arange(n_layers) * bins) // n_layers, weights=weight / weight.sum(), minlength=bins)


def layer_bin_shares(layer_scores: list[np.ndarray], bins: int = LAYER_BINS) -> np.ndarray:
    """Average share of influence per layer bin over queries (layer_bin_share of each; queries with
    no influence at all are skipped): [min(bins, L)]."""
    shares = [share for share in (layer_bin_share(scores, bins) for scores in layer_scores) if share is not None]
    return np.mean(shares, axis=0) if shares else np.zeros(min(bins, layer_scores[0].shape[0]))


def layer_bin_chart(series: list[tuple[str, np.ndarray]], n_layers: int) -> str:
    """Bars of the share of influence per layer bin, one colour per series (label, shares [bins]):
    the top-k's, and the bottom-k's beside them when a result has both tails (a legend then)."""
    figure, axes = _figure(6.0, 2.8)
    bins = len(series[0][1])
    edges = [(b * n_layers + bins - 1) // bins for b in range(bins + 1)]
    labels = [f"{edges[b]}–{edges[b + 1] - 1}" if edges[b + 1] - 1 > edges[b] else f"{edges[b]}" for b in range(bins)]
    width = 0.8 / len(series)
    colours = ("#c0392b", "#2563eb") if len(series) > 1 else ("#4c72b0",)
    for number, ((label, shares), colour) in enumerate(zip(series, colours, strict=True)):
        offset = (number - (len(series) - 1) / 2) * width
        axes.bar(np.arange(bins) + offset, shares, width=width, color=colour, label=label)
    if len(series) > 1:
        axes.legend(fontsize=8, frameon=False)
    axes.set_xticks(range(bins), labels, fontsize=8)
    axes.set_xlabel("layer bin (bottom to top)", fontsize=9)
    axes.set_ylabel("share of influence", fontsize=9)
    axes.set_ylim(0, max(max(float(shares.max()) for _, shares in series) * 1.15, 0.05))
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


def thinned(x: np.ndarray, y: np.ndarray, points: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """At most `points` of a 1 - CDF's steps, evenly spaced in log x (always the first and last):
    a thousand queries' curves then draw in a figure of a few hundred kB."""
    if len(x) <= points:
        return x, y
    keep = np.unique(np.searchsorted(x, np.geomspace(x[0], x[-1], points)).clip(0, len(x) - 1))
    return x[keep], y[keep]


TAIL_COLORS = {"positive": "#dc2626", "negative": "#2563eb"}


def tails_chart(curves: list[tuple[str, np.ndarray]], fits: list[PowerLawTail | None]) -> str:
    """Both tails of a few queries' scores on log-log axes, a colour per query: 1 - CDF of the
    positive scores (solid, its fitted power law dashed) and of the negative scores' magnitudes
    (dotted). curves: (label, scores [N]) per query."""
    import matplotlib

    figure, axes = _figure(6.4, 3.6)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, values), fit, color in zip(curves, fits, itertools.cycle(colors), strict=False):
        for side, tail in (("positive", values), ("negative", -values)):
            x, y = thinned(*ccdf_points(tail))
            if not len(x):
                continue
            fitted = f" (α = {fit.alpha:.2f})" if side == "positive" and fit else ""
            style = "-" if side == "positive" else ":"
            axes.step(x, y, style, where="post", color=color, linewidth=1.2, label=f"{label}, {side}{fitted}")
            if side == "positive" and fit is not None:
                xs = np.geomspace(fit.x_min, float(x.max()), 20)
                axes.plot(xs, (fit.tail / fit.n) * (xs / fit.x_min) ** (1 - fit.alpha), "--", color=color, linewidth=1)
    return _tail_axes(figure, axes)


def tails_band_chart(curves: list[np.ndarray], points: int = 100) -> str:
    """Both tails of many queries' scores: per tail the median over queries of 1 - CDF (of the
    positive scores, of the negative scores' magnitudes) on a common log grid, and the band from
    the 10th to the 90th percentile. curves: scores [N] per query."""
    figure, axes = _figure(6.4, 3.6)
    for side, sign in (("positive", 1.0), ("negative", -1.0)):
        tails = [np.sort(sign * values[sign * values > 0]) for values in curves]
        tails = [tail for tail in tails if len(tail)]
        if not tails:
            continue
        grid = np.geomspace(min(float(t[0]) for t in tails), max(float(t[-1]) for t in tails), points)
        # [queries, points]: the share of each query's tail at or above each x (nan where none is)
        above = np.array([(len(t) - np.searchsorted(t, grid, side="left")) / len(t) for t in tails])
        above[above == 0] = np.nan
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a grid point above every query's tail
            low, median, high = np.nanpercentile(above, [10, 50, 90], axis=0)
        color, style = TAIL_COLORS[side], "-" if side == "positive" else ":"
        axes.fill_between(grid, low, high, color=color, alpha=0.15, linewidth=0, step="post")
        label = f"{side} tails: median of {len(tails)}"
        axes.step(grid, median, style, where="post", color=color, linewidth=1.4, label=label)
    return _tail_axes(figure, axes)


def _tail_axes(figure, axes) -> str:
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("|influence score| (positive: solid, negative: dotted)", fontsize=9)
    axes.set_ylabel("1 - CDF", fontsize=9)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7, loc="lower left")
    return to_svg(figure)
