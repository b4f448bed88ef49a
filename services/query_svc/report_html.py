"""The report as one self-contained HTML page: inline CSS, SVG and script, no network, so it opens
from disk and reads on a laptop screen (everything wraps; nothing is wider than the page).

    build_report(result_dir) -> str        the page for a result directory (report_data.load_result)
    render(data) -> str                    the page for loaded ReportData

The first screen is the answer: the sign box, links to every section and the overview (a row
per query: its top sequence, score, tail exponents and layer shares) with a search over query
ids, training ids, groups and text. Each query's card (`<details>`) is drawn by the page's script
when opened, from that query's JSON (`<script type="application/json">`, never executed), so a
report of 1,000 queries x top-100 stays small and its first screen shows at once. Numbers a card
shades travel packed as integers of the query's own scale: token-wise influence as int8 (what a
colour and a tooltip of two digits show), layer-wise influence as int16.

Sections (ids, SECTIONS): overview, queries, layers, distribution, cross-query, settings; a view
whose data the result does not hold says which option stores it.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np

from . import report_plots as plots
from .report_assets import CSS, SCRIPT
from .report_data import SIGN, QueryView, ReportData, TopSequence, load_result

SECTIONS = ("overview", "queries", "layers", "distribution", "cross-query", "settings")
UNITS = (
    "nats of the completion's log-probability per unit of up-weighting the training sequence's "
    "summed log-likelihood (first order)"
)
TOKEN_CONVENTION = (
    "Token-wise influence: each position carries the influence of predicting the next token (the "
    "training loss at position t is -log p(token t+1 | tokens up to t)). By default the report shades the "
    "predicted token; untick the box to shade the position that predicts it."
)
APPROXIMATE = "≈"  # marks an index score that was not rescored exactly
SNIPPET = 90  # characters of the top sequence's text in the overview
LINE_HEADER = '<th title="its line in the training data file (a corpus: its row); — where not recorded">line</th>'
OVERVIEW_ROWS = 100  # rows of the overview listed before a search or "show all" (a browser lays out 1,000 slowly)
_POSITIVE, _NEGATIVE = (220, 38, 38), (37, 99, 235)


def build_report(result_dir: str | Path) -> str:
    return render(load_result(result_dir))


def render(data: ReportData) -> str:
    body = [
        "<h1>Influence report</h1>",
        f'<p class="sign" id="sign">{_e(_sign_sentence(data))}</p>',
        "<nav>" + "".join(f'<a href="#{s}">{s.replace("-", " ")}</a>' for s in SECTIONS) + "</nav>",
        _overview(data),
        "<script>performance.mark('overview')</script>",  # the first screen is parsed (the browser test reads it)
        _queries(data),
        _layers(data),
        _distribution(data),
        _cross(data),
        _settings(data),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Influence report</title><style>{CSS}</style></head>"
        f"<body><main>{''.join(body)}</main>{_payload(data)}<script>{SCRIPT}</script></body></html>\n"
    )


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _json(value) -> str:
    """JSON safe inside a <script> element (no "</" can end it early)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")


def _section(name: str, title: str, content: str) -> str:
    return f'<section id="{name}"><h2>{_e(title)}</h2>{content}</section>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _sign_sentence(data: ReportData) -> str:
    what = "self-influence of each training sequence" if data.kind == "self" else "scores"
    return f"Sign and units: {SIGN} ({what} in {UNITS})."


def _score(sequence: TopSequence) -> str:
    return f"{APPROXIMATE if sequence.approximate else ''}{sequence.score:+.4g}"


def _packed(values: np.ndarray, scale: float, dtype) -> str:
    """values as integers of `scale` (dtype int8: [-127, 127], int16: [-32767, 32767]), little-endian
    bytes in base64: what the page's script unpacks (unpack(text, bits)) and a colour or a tooltip shows."""
    levels = np.iinfo(dtype).max
    quantized = np.zeros(values.shape) if scale <= 0 else np.clip(np.rint(values / scale * levels), -levels, levels)
    return base64.b64encode(quantized.astype(np.dtype(dtype).newbyteorder("<")).tobytes()).decode("ascii")


# -- the overview -------------------------------------------------------------------------------


def _tail_fits(data: ReportData) -> list[tuple[plots.PowerLawTail | None, plots.PowerLawTail | None]]:
    """Per query the power-law fits of its positive tail and of its negative scores' magnitudes."""
    return [(plots.fit_power_law(row), plots.fit_power_law(-row)) for row in _distribution_rows(data)]


def _distribution_rows(data: ReportData) -> list[np.ndarray]:
    """Each query's scores [N] (under TF-IDF: its candidates' scores only)."""
    rows = []
    for position in range(data.scores.shape[0]):
        row = data.scores[position]
        rows.append(row[data.scored[position]] if data.scored is not None else row)
    return rows


def _line(sequence: TopSequence) -> str:
    """Its line in the user's TRAIN.jsonl, or "—" where the dataset did not record it."""
    return str(sequence.line) if sequence.line is not None else "—"


def _alpha(fit: plots.PowerLawTail | None) -> str:
    return f"{fit.alpha:.2f}" if fit else "—"


def _sparkline(share: np.ndarray | None) -> str:
    """The layer-bin shares as a tiny bar chart (bottom layers left), the numbers in its tooltip."""
    if share is None:
        return "—"
    bars = "".join(
        f'<rect x="{4 * b}" y="{16 - 16 * v:.1f}" width="3" height="{16 * v:.1f}"/>' for b, v in enumerate(share)
    )
    title = "layer bins, bottom to top: " + " ".join(f"{v:.0%}" for v in share)
    return f'<svg class="spark" width="{4 * len(share)}" height="16"><title>{_e(title)}</title>{bars}</svg>'


def _overview(data: ReportData) -> str:
    search = (
        '<div class="search"><input type="search" id="search" placeholder="filter: query id, training id, group '
        'or text" aria-label="filter queries"><span id="matches" class="meta"></span></div>'
    )
    if data.kind == "self":
        rows = "".join(
            f"<tr><td class='num'>{s.rank}</td><td>{_e(s.id)}</td><td class='num'>{_line(s)}</td>"
            f"<td>{_e(s.text[:SNIPPET])}</td><td class='num'>{s.score:+.4g}</td></tr>"
            for s in data.self_top
        )
        content = _note("A self-influence result: the training sequences with the highest self-influence.")
        header = f"<tr><th>rank</th><th>id</th>{LINE_HEADER}<th>text</th><th>self-influence</th></tr>"
        table = f'<table class="overview">{header}{rows}</table>'
        return _section("overview", "Overview", content + table)
    fits = _tail_fits(data)
    rows = []
    for position, (query, (positive, negative)) in enumerate(zip(data.queries, fits, strict=True)):
        first = query.top[0] if query.top else None
        share = plots.layer_bin_share(query.layers.scores) if query.layers is not None and query.top else None
        rows.append(
            f'<tr data-q="{position}"{" hidden" if position >= OVERVIEW_ROWS else ""}>'
            f'<td><a href="#query-{position}">{_e(query.id)}</a></td><td>{_e(query.group)}</td>'
            + (
                f"<td>{_e(first.id)}</td><td class='num'>{_line(first)}</td>"
                f"<td class='snippet'>{_e(first.text[:SNIPPET])}</td><td class='num'>{_score(first)}</td>"
                if first
                else "<td colspan='4'>no training sequence ranked</td>"
            )
            + f"<td class='num'>{_alpha(positive)}</td><td class='num'>{_alpha(negative)}</td>"
            f"<td>{_sparkline(share)}</td></tr>"
        )
    header = (
        f"<tr><th>query</th><th>group</th><th>top-1 training id</th>{LINE_HEADER}<th>its text</th><th>score</th>"
        '<th title="power-law exponent of the positive tail">α +</th>'
        '<th title="power-law exponent of the negative tail (magnitudes)">α −</th><th>layer share</th></tr>'
    )
    notes = []
    if any(s.approximate for q in data.queries for s in q.top):
        notes.append(
            f"{APPROXIMATE}: an index score, not rescored exactly (approximate); score with --rescore to rank by "
            "exact scores."
        )
    notes.append(
        f"{len(data.queries)} queries x {data.scores.shape[1]} training sequences. A query's link opens its card "
        "below; α: the power-law exponent of each tail (distribution); layer share: its top sequences' influence "
        "per layer bin, bottom layers left (layers)."
    )
    more = ""
    if len(data.queries) > OVERVIEW_ROWS:
        notes.append(f"The first {OVERVIEW_ROWS} queries are listed; a search looks through all of them.")
        more = f'<button type="button" id="show-all">show all {len(data.queries)} queries</button>'
    return _section(
        "overview",
        "Overview",
        search + "".join(_note(n) for n in notes) + f'<table class="overview">{header}{"".join(rows)}</table>' + more,
    )


# -- the query cards (drawn by the script when opened) -------------------------------------------


def _sequence_table(data: ReportData) -> tuple[list, dict[str, int]]:
    """Every training sequence a card shows, once: [id, text, display tokens or null, line in the
    user's file or null], and the position of each id in that list."""
    table, position = [], {}
    for query in data.queries:
        for sequence in query.top + query.bottom:
            if sequence.id not in position:
                position[sequence.id] = len(table)
                tokens = token_text(sequence.tokens) if sequence.tokens else None
                table.append([sequence.id, sequence.text, tokens, sequence.line])
    return table, position


def _card_payload(query: QueryView, sequence_position: dict[str, int]) -> dict:
    """One query's card: its own tokens as scored [[text, log-probability or None]] (--per-token),
    its top sequences [[sequence, score, approximate]] and its bottom ones alike (--bottom-k),
    token-wise influence (every sequence's token scores, top then bottom, in one int8 array of the
    query's token scale, and each one's count) and heatmaps (rows x top sequences, int16 of their
    own scale, row by row; the bottom sequences' layers on their own scale)."""
    card = {"top": [[sequence_position[s.id], s.score, int(s.approximate)] for s in query.top]}
    if query.bottom:
        card["bottom"] = [[sequence_position[s.id], s.score, int(s.approximate)] for s in query.bottom]
    if query.tokens:
        shown = token_text([token for token, _ in query.tokens])
        card["query"] = [[text, logprob] for text, (_, logprob) in zip(shown, query.tokens, strict=True)]
    if any(s.token_scores for s in query.top + query.bottom):
        rows = [np.asarray(s.token_scores or [], dtype=np.float64) for s in query.top + query.bottom]
        values = np.concatenate(rows)
        scale = float(np.abs(values).max()) if values.size else 0.0
        counts = [len(row) for row in rows]
        card["tokens"] = {"scale": scale, "counts": counts, "values": _packed(values, scale, np.int8)}
    for key, view in (("layers", query.layers), ("modules", query.modules), ("bottom_layers", query.bottom_layers)):
        if view is not None and query.top:
            scale = float(np.abs(view.scores).max()) if view.scores.size else 0.0
            card[key] = {"rows": view.layers, "scale": scale, "cells": _packed(view.scores, scale, np.int16)}
    return card


def _card(position: int, query: QueryView) -> str:
    summary = (
        f"<summary><b>{_e(query.id)}</b>"
        + (f' <span class="meta">group {_e(query.group)}</span>' if query.group else "")
        + f' <span class="meta">{_e(query.prompt[:SNIPPET])}</span></summary>'
    )
    return (
        f'<details class="query" id="query-{position}" data-q="{position}">{summary}'
        f'<div class="qa"><b>Prompt:</b> {_e(query.prompt)}</div>'
        f'<div class="qa"><b>Completion:</b> {_e(query.completion)}</div>'
        '<div class="card"></div></details>'
    )


def _queries(data: ReportData) -> str:
    if data.kind == "self":
        return _section("queries", "Queries", _note("A self-influence result has no queries."))
    controls = (
        '<div class="controls"><button type="button" id="expand-all">open all shown</button>'
        '<button type="button" id="collapse-all">close all</button>'
        '<label><input type="checkbox" id="predicted" checked> shade the predicted token</label></div>'
    )
    notes = [TOKEN_CONVENTION] if "tokens" not in data.missing else [data.missing["tokens"]]
    content = "".join(_note(n) for n in notes) + controls
    content += "".join(_card(position, query) for position, query in enumerate(data.queries))
    return _section("queries", "Queries and their most influential training sequences", content)


def _payload(data: ReportData) -> str:
    """The data the script draws cards from: the training sequences once, and one element per query
    (parsed only when its card opens or a search needs it)."""
    if data.kind == "self":
        return ""
    table, position = _sequence_table(data)
    queries = [[q.id, q.group, q.prompt, q.completion] for q in data.queries]
    parts = [
        f'<script type="application/json" id="sequences">{_json(table)}</script>',
        f'<script type="application/json" id="queries-data">{_json(queries)}</script>',
    ]
    parts += [
        f'<script type="application/json" id="card-{i}">{_json(_card_payload(q, position))}</script>'
        for i, q in enumerate(data.queries)
    ]
    return "".join(parts)


def token_text(tokens: list[str]) -> list[str]:
    """Display text of each token: byte-level (Ġ, Ċ) and sentencepiece (▁) markers as spaces and
    newlines; a word-level vocabulary (no markers at all) gets a space between tokens."""
    marked = any(t.startswith(("Ġ", "▁")) for t in tokens)
    shown = [t.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n") for t in tokens]
    return shown if marked else [t if i == 0 else f" {t}" for i, t in enumerate(shown)]


# -- layers, distribution, cross-query ---------------------------------------------------------


def _shade(score: float, scale: float) -> str:
    strength = min(abs(score) / scale, 1.0) if scale > 0 and math.isfinite(score) else 0.0
    red, green, blue = _POSITIVE if score > 0 else _NEGATIVE
    return f"background:rgba({red},{green},{blue},{0.85 * strength:.3f})"


def _layers(data: ReportData) -> str:
    title = "Layer-wise influence"
    views = [query.layers for query in data.queries if query.layers is not None and query.top]
    if not views:
        return _section("layers", title, _note(data.missing.get("layers", "no query has a top sequence")))
    series = [("most positive (top-k)", plots.layer_bin_shares([view.scores for view in views]))]
    bottom = [query.bottom_layers for query in data.queries if query.bottom_layers is not None and query.bottom]
    if bottom:
        series.append(("most negative (bottom-k)", plots.layer_bin_shares([view.scores for view in bottom])))
    header = "".join(f"<th>bin {b + 1}</th>" for b in range(len(series[0][1])))
    rows = "".join(
        f"<tr><th>{_e(label)}</th>" + "".join(f'<td class="num">{share:.1%}</td>' for share in shares) + "</tr>"
        for label, shares in series
    )
    negative = (
        f" Blue bars: the same for the most negative sequences of {len(bottom)} queries (--bottom-k)."
        if bottom
        else ""
    )
    return _section(
        "layers",
        title,
        f"<figure>{plots.layer_bin_chart(series, len(views[0].layers))}<figcaption>Average share of influence "
        f"per layer bin over {len(views)} queries (a query's share of a layer: the absolute influence of its "
        f"top sequences there, over all layers).{negative} Each query's card has its heatmaps (layers, and "
        "modules with --per-module, x its top sequences; layers x its most negative ones with --bottom-k)."
        "</figcaption></figure>"
        f"<table><tr><th></th>{header}</tr>{rows}</table>",
    )


LEGEND_LIMIT = 10  # queries drawn each in a colour of its own, with a legend; more: one colour per tail


def _distribution(data: ReportData) -> str:
    title = "Distribution of scores"
    rows = _distribution_rows(data)
    suffix = " (TF-IDF candidates)" if data.scored is not None else ""
    labels = ["self-influence" if data.kind == "self" else f"query {q.id}" for q in data.queries] or ["self-influence"]
    curves = [(label + suffix, row) for label, row in zip(labels, rows, strict=False)]
    fits = [plots.fit_power_law(values) for _, values in curves]
    if len(curves) <= LEGEND_LIMIT:
        svg = plots.tails_chart(curves, fits)
        drawn = (
            "dashed: a power law p(x) ∝ x^-α fitted to the top 20% of the positive tail (maximum likelihood), whose "
            "1 - CDF falls with slope 1 - α."
        )
    else:
        svg = plots.tails_band_chart([values for _, values in curves])
        drawn = "per tail the median over queries, shaded from the 10th to the 90th percentile."
    caption = (
        f"Both tails of all {len(curves)} score distributions on log-log axes: 1 - CDF of the positive scores "
        f"(solid) and of the negative scores' magnitudes (dotted); {drawn} Every query's power-law exponent α of "
        "both tails is in the overview."
    )
    if data.scored is not None:
        caption += (
            " This run was lexically filtered (--bm25 or --tfidf): only each query's candidates were scored, so only "
            "their distribution is in the result (score without the filter for the unfiltered one)."
        )
    counts = [(int((v > 0).sum()), int((v < 0).sum()), len(v)) for _, v in curves]
    positive, negative, total = (sum(c[i] for c in counts) for i in range(3))
    table = (
        "<table><tr><th>scores</th><th>positive</th><th>negative</th><th>queries with a fitted positive tail</th></tr>"
        f"<tr><td>{total}</td><td class='num'>{positive}</td><td class='num'>{negative}</td>"
        f"<td class='num'>{sum(f is not None for f in fits)} of {len(fits)} (a tail needs {plots.MIN_TAIL} "
        "positive scores)</td></tr></table>"
    )
    return _section("distribution", title, f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>{table}")


def _cross(data: ReportData) -> str:
    title = "Cross-query influence"
    if not data.cross:
        return _section("cross-query", title, _note(data.missing.get("cross", "no groups")))
    parts = [
        _note(
            "Row a, column b: the mean score on query b of query a's top sequences; shaded on one scale per "
            "group (red +, blue -). A strong diagonal and weak off-diagonal mean the related queries draw on "
            "different training sequences."
            + (
                " With --bottom-k, a second table does the same for each query's most negative sequences: "
                "a strongly negative diagonal with negative off-diagonal cells means the related queries are "
                "lowered by the same training sequences."
                if any(cross.bottom is not None for cross in data.cross)
                else ""
            )
        )
    ]
    for cross in data.cross:
        tables = [("top", cross.table)] + ([("most negative", cross.bottom)] if cross.bottom is not None else [])
        finite = np.concatenate([table[np.isfinite(table)] for _, table in tables])
        scale = float(np.abs(finite).max()) if finite.size else 0.0
        header = "".join(f"<th>on {_e(q)}</th>" for q in cross.query_ids)
        parts.append(f"<h3>Group {_e(cross.group)}</h3>")
        for tail, table in tables:
            body = "".join(
                f"<tr><th>{tail} of {_e(source)}</th>"
                + "".join(f'<td class="num" style="{_shade(value, scale)}">{value:+.4g}</td>' for value in table[row])
                + "</tr>"
                for row, source in enumerate(cross.query_ids)
            )
            parts.append(f'<table class="cross {tail.replace(" ", "-")}"><tr><th></th>{header}</tr>{body}</table>')
    return _section("cross-query", title, "".join(parts))


# -- settings and provenance --------------------------------------------------------------------


def settings_rows(data: ReportData) -> list[tuple[str, str]]:
    """The settings table's rows (label, value), in order: what the run did."""
    report = data.report
    settings = report.get("settings", {})
    rows = [
        ("result kind", data.kind),
        ("results.json schema", str(report.get("schema_version", 1))),
        ("model", settings.get("model", "not recorded")),
        ("factor set", settings.get("factor_set", "not recorded")),
        ("dataset", settings.get("dataset", "") or "—"),
        ("strategy", report.get("strategy", "")),
        ("fisher", settings.get("fisher", "not recorded")),
        ("damping", report.get("damping", "")),
        ("query rank", report.get("query_rank") or "full"),
        ("top k", settings.get("top_k", "")),
        ("modules", f"{len(report.get('modules', []))}: " + ", ".join(report.get("modules", []))),
        ("coverage", settings.get("coverage", {}).get("summary", "not recorded")),
        ("queries x training sequences", f"{len(data.queries)} x {data.scores.shape[1]}"),
    ]
    if settings.get("bottom_k"):
        rows.insert(rows.index(("top k", settings.get("top_k", ""))) + 1, ("bottom k", settings["bottom_k"]))
    lexical = data.lexical
    rows.append(
        (
            "lexical filter",
            f"{lexical[0]}: {lexical[1]['k']} per query, {lexical[1]['scored_sequences']} scored" if lexical else "off",
        )
    )
    index = report.get("index")
    rows.append(
        (
            "index and rescoring",
            f"{index['name']}: {index.get('projection', '')} projection, rescored "
            f"{index.get('rescore')} per query ({index.get('rescored_sequences')} sequences)" + _lexical_sources(index)
            if index
            else "none (every sequence's gradient recomputed)",
        )
    )
    rows.append(("exact or approximate", _exactness(data)))
    return rows


def _lexical_sources(index: dict) -> str:
    """With --lexical: the BM25 candidates merged in, and the share of the final top-k each source held."""
    if not index.get("lexical"):
        return ""
    sources = index["sources"]
    return (
        f", with {index['lexical']} BM25 candidates per query; of the final top-k the index's candidates held "
        f"{sources['index']['recall']:.0%}, BM25's {sources['lexical']['recall']:.0%}"
    )


def _exactness(data: ReportData) -> str:
    approximate = sum(s.approximate for q in data.queries for s in q.top)
    if approximate:
        return (
            f"{approximate} top-k scores are index scores, not rescored (approximate, marked {APPROXIMATE}); "
            "scores.safetensors holds index scores wherever a sequence was not rescored"
        )
    if data.report.get("index"):
        return "every top-k score exact (rescored); scores.safetensors holds index scores elsewhere"
    return "exact (every score computed from recomputed gradients)"


def provenance_rows(data: ReportData) -> list[tuple[str, str]]:
    """Where the result came from: the tool, the date and each input's path and sha256."""
    settings = data.report.get("settings", {})
    rows = [
        ("tool version", settings.get("tool_version", "not recorded")),
        ("created", settings.get("created", "not recorded")),
        ("model fingerprint", settings.get("model_fingerprint", "not recorded")),
    ]
    for name, source in data.report.get("inputs", {}).items():
        rows.append((f"{name} (input)", f"{source.get('path', '')}  sha256 {source.get('sha256', 'not recorded')}"))
    if not data.report.get("inputs"):
        rows.append(("inputs", "not recorded (the CLI records its input files' paths and sha256)"))
    return rows


def _settings(data: ReportData) -> str:
    def table(rows):
        cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
        return f'<table class="settings">{cells}</table>'

    return _section(
        "settings",
        "Settings and provenance",
        table(settings_rows(data)) + "<h3>Provenance</h3>" + table(provenance_rows(data)),
    )
