"""The report as one self-contained HTML page: inline CSS and SVG, no scripts, no network, so it
opens from disk and reads on a laptop screen (everything wraps; nothing is wider than the page).

    build_report(result_dir) -> str        the page for a result directory (report_data.load_result)
    render(data) -> str                    the page for loaded ReportData

Sections (ids): settings, queries, layers, distribution, cross-query; a view whose data the
result does not hold says which option stores it.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from . import report_plots as plots
from .report_data import QueryView, ReportData, TopSequence, load_result
from .reports import SIGN

SECTIONS = ("settings", "queries", "layers", "distribution", "cross-query")
UNITS = (
    "nats of the completion's log-probability per unit of up-weighting the training sequence's "
    "summed log-likelihood (first order)"
)
_POSITIVE, _NEGATIVE = (220, 38, 38), (37, 99, 235)

CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1100px;margin:0 auto;padding:16px 20px 40px}
h1{font-size:22px;margin:8px 0}
h2{font-size:18px;margin:0 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:15px;margin:12px 0 6px}
section,article{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:12px 16px;margin:14px 0;
  overflow-wrap:anywhere;word-break:break-word;min-width:0}
article{border-color:#e1e4e8;background:#fdfdfd}
nav a{margin-right:14px}
.sign{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 12px}
.note{color:#57606a;font-style:italic}
table{border-collapse:collapse;width:100%;table-layout:fixed}
th,td{border:1px solid #d0d7de;padding:4px 6px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#f6f8fa}
table.settings th{width:28%}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.qa{white-space:pre-wrap;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;
  background:#f6f8fa;border-radius:4px;padding:6px 8px;margin:4px 0}
.qa b{font-family:system-ui,sans-serif}
ol.top{padding-left:22px;margin:6px 0}
ol.top li{margin:6px 0}
.meta{color:#57606a;font-size:12px}
.tokens{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;line-height:1.9;
  white-space:pre-wrap;overflow-wrap:anywhere}
.tokens span{border-radius:2px}
.scale{display:flex;align-items:center;gap:8px;font-size:12px;color:#57606a;flex-wrap:wrap}
.scale .bar{width:180px;max-width:40%;height:10px;border:1px solid #d0d7de;
  background:linear-gradient(to right,rgb(37,99,235),#fff,rgb(220,38,38))}
svg.figure{display:block;max-width:100%;height:auto}
figure{margin:8px 0;max-width:100%}
figcaption{color:#57606a;font-size:12px}
"""


def build_report(result_dir: str | Path) -> str:
    return render(load_result(result_dir))


def render(data: ReportData) -> str:
    body = [
        "<h1>Influence report</h1>",
        f'<p class="sign" id="sign">{_e(_sign_sentence(data))}</p>',
        "<nav>" + "".join(f'<a href="#{s}">{s.replace("-", " ")}</a>' for s in SECTIONS) + "</nav>",
        _settings(data),
        _queries(data),
        _layers(data),
        _distribution(data),
        _cross(data),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Influence report</title><style>{CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _section(name: str, title: str, content: str) -> str:
    return f'<section id="{name}"><h2>{_e(title)}</h2>{content}</section>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _sign_sentence(data: ReportData) -> str:
    what = "self-influence of each training sequence" if data.kind == "self" else "scores"
    return f"Sign and units: {SIGN} ({what} in {UNITS})."


# -- settings ---------------------------------------------------------------------------------


def _settings(data: ReportData) -> str:
    report = data.report
    settings = report.get("settings", {})
    rows = [
        ("result kind", data.kind),
        ("model", settings.get("model", "not recorded")),
        ("factor set", settings.get("factor_set", "not recorded")),
        ("dataset", settings.get("dataset", "") or "—"),
        ("strategy", report.get("strategy", "")),
        ("damping", report.get("damping", "")),
        ("query rank", report.get("query_rank") or "full"),
        ("top k", settings.get("top_k", "")),
        ("modules", f"{len(report.get('modules', []))}: " + ", ".join(report.get("modules", []))),
        ("coverage", settings.get("coverage", {}).get("summary", "not recorded")),
        ("queries x training sequences", f"{len(data.queries)} x {data.scores.shape[1]}"),
    ]
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
            f"{index.get('rescore')} per query ({index.get('rescored_sequences')} sequences)"
            if index
            else "none (every sequence's gradient recomputed)",
        )
    )
    table = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return _section("settings", "Settings", f'<table class="settings">{table}</table>')


# -- queries and token-wise influence --------------------------------------------------------


def _shade(score: float, scale: float) -> str:
    strength = min(abs(score) / scale, 1.0) if scale > 0 and math.isfinite(score) else 0.0
    red, green, blue = _POSITIVE if score > 0 else _NEGATIVE
    return f"background:rgba({red},{green},{blue},{0.85 * strength:.3f})"


def token_text(tokens: list[str]) -> list[str]:
    """Display text of each token: byte-level (Ġ, Ċ) and sentencepiece (▁) markers as spaces and
    newlines; a word-level vocabulary (no markers at all) gets a space between tokens."""
    marked = any(t.startswith(("Ġ", "▁")) for t in tokens)
    shown = [t.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n") for t in tokens]
    return shown if marked else [t if i == 0 else f" {t}" for i, t in enumerate(shown)]


def _token_spans(sequence: TopSequence, scale: float) -> str:
    spans = [
        f'<span style="{_shade(score, scale)}" title="{_e(f"{score:+.4g}")}">{_e(text)}</span>'
        for text, score in zip(token_text(sequence.tokens or []), sequence.token_scores or [], strict=True)
    ]
    return f'<div class="tokens">{"".join(spans)}</div>'


def _scale_legend(scale: float) -> str:
    return (
        f'<div class="scale"><span>token-wise influence, shared scale for this query:</span>'
        f'<span>{-scale:+.3g}</span><span class="bar"></span><span>{scale:+.3g}</span>'
        "<span>(blue lowers, red raises the completion's log-probability)</span></div>"
    )


def _query_article(position: int, query: QueryView) -> str:
    parts = [
        f'<article class="query" id="query-{position}"><h3>Query {_e(query.id)}'
        + (f' <span class="meta">group {_e(query.group)}</span>' if query.group else "")
        + "</h3>",
        f'<div class="qa"><b>Prompt:</b> {_e(query.prompt)}</div>',
        f'<div class="qa"><b>Completion:</b> {_e(query.completion)}</div>',
    ]
    with_tokens = [s for s in query.top if s.tokens]
    scale = max((max(abs(v) for v in s.token_scores) for s in with_tokens if s.token_scores), default=0.0)
    if with_tokens:
        parts.append(_scale_legend(scale))
    items = []
    for sequence in query.top:
        body = _token_spans(sequence, scale) if sequence.tokens else f'<div class="tokens">{_e(sequence.text)}</div>'
        meta = f"#{sequence.rank} · {_e(sequence.id)} · score {sequence.score:+.4g}"
        items.append(f'<li><span class="meta">{meta}</span>{body}</li>')
    parts.append(f'<ol class="top">{"".join(items)}</ol>' if items else _note("no training sequence ranked"))
    if query.layers is not None and query.top:
        svg = plots.layer_heatmap(query.layers.layers, query.layers.scores, [f"#{s.rank}" for s in query.top])
        parts.append(
            f"<figure>{svg}<figcaption>Influence of each layer (rows, bottom to top) on this query, for its top "
            "sequences (columns); red raises, blue lowers the completion's log-probability.</figcaption></figure>"
        )
    parts.append("</article>")
    return "".join(parts)


def _queries(data: ReportData) -> str:
    if data.kind == "self":
        items = "".join(
            f'<li><span class="meta">#{s.rank} · {_e(s.id)} · self-influence {s.score:+.4g}</span>'
            f'<div class="tokens">{_e(s.text)}</div></li>'
            for s in data.self_top
        )
        content = _note("A self-influence result: the training sequences with the highest self-influence.")
        return _section("queries", "Top sequences", content + f'<ol class="top">{items}</ol>')
    content = "".join(_query_article(position, query) for position, query in enumerate(data.queries))
    if "tokens" in data.missing:
        content = _note(data.missing["tokens"]) + content
    return _section("queries", "Queries and their most influential training sequences", content)


# -- layers, distribution, cross-query ---------------------------------------------------------


def _layers(data: ReportData) -> str:
    title = "Layer-wise influence"
    views = [query.layers for query in data.queries if query.layers is not None and query.top]
    if not views:
        return _section("layers", title, _note(data.missing.get("layers", "no query has a top sequence")))
    shares = plots.layer_bin_shares([view.scores for view in views])
    table = "".join(f'<td class="num">{share:.1%}</td>' for share in shares)
    return _section(
        "layers",
        title,
        f"<figure>{plots.layer_bin_chart(shares, len(views[0].layers))}<figcaption>Average share of influence "
        f"per layer bin over {len(views)} queries (a query's share of a layer: the absolute influence of its "
        "top sequences there, over all layers).</figcaption></figure>"
        f"<table><tr>{''.join(f'<th>bin {b + 1}</th>' for b in range(len(shares)))}</tr><tr>{table}</tr></table>",
    )


def _distribution(data: ReportData) -> str:
    title = "Distribution of scores"
    curves, labels = [], []
    for position in range(data.scores.shape[0]):
        row = data.scores[position]
        if data.scored is not None:
            row = row[data.scored[position]]
        label = "self-influence" if data.kind == "self" else f"query {data.queries[position].id}"
        curves.append((label + (" (TF-IDF candidates)" if data.scored is not None else ""), row))
        labels.append(label)
    fits = [plots.fit_power_law(values) for _, values in curves]
    shown = curves[:10]
    svg = plots.ccdf_chart(shown, fits[: len(shown)])
    rows = "".join(
        f"<tr><td>{_e(label)}</td><td class='num'>{int((values > 0).sum())} of {len(values)}</td>"
        + (
            f"<td class='num'>{fit.alpha:.3f}</td><td class='num'>{fit.tail} above {fit.x_min:.3g}</td>"
            if fit
            else f"<td colspan='2'>too few positive scores to fit (under {plots.MIN_TAIL})</td>"
        )
        + "</tr>"
        for (label, values), fit in zip(curves, fits, strict=True)
    )
    caption = (
        "1 - CDF of the positive scores on log-log axes; dashed: a power law p(x) ∝ x^-α fitted to the top 20% "
        "of each query's positive scores (maximum likelihood), whose 1 - CDF falls with slope 1 - α."
    )
    if data.scored is not None:
        caption += (
            " This run was lexically filtered (--bm25 or --tfidf): only each query's candidates were scored, so only "
            "their distribution is in the result (score without the filter for the unfiltered one)."
        )
    if len(curves) > len(shown):
        caption += f" The first {len(shown)} of {len(curves)} queries are drawn; the table lists all."
    return _section(
        "distribution",
        title,
        f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>"
        "<table><tr><th>scores of</th><th>positive</th><th>tail exponent α</th><th>tail</th></tr>"
        f"{rows}</table>",
    )


def _cross(data: ReportData) -> str:
    title = "Cross-query influence"
    if not data.cross:
        return _section("cross-query", title, _note(data.missing.get("cross", "no groups")))
    parts = [
        _note(
            "Row a, column b: the mean score on query b of query a's top sequences; shaded on one scale per "
            "group (red +, blue -). A strong diagonal and weak off-diagonal mean the related queries draw on "
            "different training sequences."
        )
    ]
    for cross in data.cross:
        finite = cross.table[np.isfinite(cross.table)]
        scale = float(np.abs(finite).max()) if finite.size else 0.0
        header = "".join(f"<th>on {_e(q)}</th>" for q in cross.query_ids)
        body = "".join(
            f"<tr><th>top of {_e(source)}</th>"
            + "".join(f'<td class="num" style="{_shade(value, scale)}">{value:+.4g}</td>' for value in cross.table[row])
            + "</tr>"
            for row, source in enumerate(cross.query_ids)
        )
        parts.append(f"<h3>Group {_e(cross.group)}</h3><table><tr><th></th>{header}</tr>{body}</table>")
    return _section("cross-query", title, "".join(parts))
