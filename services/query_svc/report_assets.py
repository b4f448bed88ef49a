"""The report page's inline style and script (report_html.py writes them into the page).

The script draws a query's card when its `<details>` opens, from the JSON the page carries
(`#sequences`: [id, text, display tokens] of every training sequence a card shows; `#queries-data`:
[id, group, prompt, completion] per query; `#card-N`: one query's top (and bottom) sequences, token-wise
influence and heatmaps, as report_html._card_payload writes them), filters the overview and the
cards by a search, and makes a query's rows into a CSV or JSON download (a blob: no network).
"""

CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1100px;margin:0 auto;padding:16px 20px 40px}
h1{font-size:22px;margin:8px 0}
h2{font-size:18px;margin:0 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:15px;margin:12px 0 6px}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:12px 16px;margin:14px 0;
  overflow-wrap:anywhere;word-break:break-word;min-width:0}
nav{position:sticky;top:0;background:#f6f8fa;padding:6px 0;z-index:2;border-bottom:1px solid #d0d7de}
nav a{margin-right:14px}
.sign{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 12px;margin:6px 0}
.note{color:#57606a;font-style:italic;margin:4px 0}
table{border-collapse:collapse;width:100%;table-layout:fixed}
th,td{border:1px solid #d0d7de;padding:4px 6px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#f6f8fa}
table.settings th{width:28%}
table.overview td.snippet{color:#57606a;font-size:12px}
table.overview th:nth-child(1),table.overview th:nth-child(3){width:12%}
table.overview th:nth-child(2){width:9%}
table.overview th:nth-child(5),table.overview th:nth-child(6),table.overview th:nth-child(7){width:7%}
table.overview th:nth-child(8){width:9%}
td.num{text-align:right;font-variant-numeric:tabular-nums}
svg.spark rect{fill:#4c72b0}
.search{display:flex;gap:10px;align-items:center;margin:4px 0 8px}
.search input{flex:1;max-width:520px;font:inherit;padding:4px 8px;border:1px solid #d0d7de;border-radius:4px}
.controls{display:flex;gap:10px;align-items:center;flex-wrap:wrap;margin:6px 0}
button{font:inherit;font-size:12px;padding:2px 8px;border:1px solid #d0d7de;border-radius:4px;background:#f6f8fa;
  cursor:pointer}
section,details.query{scroll-margin-top:40px}
details.query{border:1px solid #e1e4e8;border-radius:6px;margin:6px 0;padding:4px 10px;background:#fdfdfd;min-width:0}
details.query>summary{cursor:pointer;padding:2px 0}
.qa{white-space:pre-wrap;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;
  background:#f6f8fa;border-radius:4px;padding:6px 8px;margin:4px 0}
.qa b{font-family:system-ui,sans-serif}
.query-tokens .target{text-decoration:underline;text-decoration-color:#9a6700;text-underline-offset:3px}
ol.top{padding-left:30px;margin:6px 0}
ol.top li{margin:6px 0}
.tails{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:12px}
.tails h4{margin:6px 0 0;font-size:13px}
.meta{color:#57606a;font-size:12px}
.approx{color:#9a6700;font-weight:600}
.tokens{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;line-height:1.9;
  white-space:pre-wrap;overflow-wrap:anywhere}
.tokens span{border-radius:2px}
.tokens button{margin-left:6px}
.scale{display:flex;align-items:center;gap:8px;font-size:12px;color:#57606a;flex-wrap:wrap}
.scale .bar{width:180px;max-width:40%;height:10px;border:1px solid #d0d7de;
  background:linear-gradient(to right,rgb(37,99,235),#fff,rgb(220,38,38))}
.heat{display:grid;gap:0;margin:8px 0;font-size:10px;max-width:100%}
.heat div{min-height:12px}
.heat .row{padding-right:6px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;line-height:12px}
.heat .col{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap;overflow:hidden;max-height:90px;
  line-height:1;font-size:9px;text-align:left}
svg.figure{display:block;max-width:100%;height:auto}
figure{margin:8px 0;max-width:100%}
figcaption{color:#57606a;font-size:12px}
"""

SCRIPT = r"""
(() => {
const CROP = 80, WINDOW = 60, TEXT = 600;
const $ = (id) => document.getElementById(id);
const parsed = {};
const json = (id) => parsed[id] || (parsed[id] = JSON.parse($(id).textContent));
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
const fmt = (v) => (v >= 0 ? '+' : '') + v.toPrecision(3);
const shade = (n) => {  // n: a value over its scale, in [-1, 1]
  const a = (0.85 * Math.min(Math.abs(n), 1)).toFixed(3);
  return n > 0 ? `rgba(220,38,38,${a})` : `rgba(37,99,235,${a})`;
};
function unpack(text, bits) {  // report_html._packed: base64 of little-endian int8 or int16, as values in [-1, 1]
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  const ints = bits === 8 ? new Int8Array(bytes.buffer) : new Int16Array(bytes.buffer);
  const levels = bits === 8 ? 127 : 32767;
  return Float64Array.from(ints, (v) => v / levels);
}
const unpacked = {};
function tokenScores(i, r) {  // query i's r-th sequence's token scores (top, then bottom) over the query's scale (null: none)
  const card = json('card-' + i);
  if (!card.tokens || !card.tokens.counts[r]) return null;
  const all = unpacked['t' + i] || (unpacked['t' + i] = unpack(card.tokens.values, 8));
  const start = card.tokens.counts.slice(0, r).reduce((a, b) => a + b, 0);
  return all.subarray(start, start + card.tokens.counts[r]);
}

function tokenSpans(tokens, q, scale, from, to) {
  let out = '';
  for (let i = from; i < to; i++) {
    out += `<span style="background:${shade(q[i])}" title="${fmt(q[i] * scale)}">${esc(tokens[i])}</span>`;
  }
  return out;
}

function shown(q) {  // what each token shows: its own position, or (predicted) the position before it
  if (!$('predicted').checked) return q;
  return Array.from(q, (_, i) => (i === 0 ? 0 : q[i - 1]));
}

function strongest(q) {  // start of the WINDOW tokens with the most absolute influence
  let sum = 0, best = 0, start = 0;
  for (let i = 0; i < q.length; i++) {
    sum += Math.abs(q[i]);
    if (i >= WINDOW) sum -= Math.abs(q[i - WINDOW]);
    if (i >= WINDOW - 1 && sum > best) { best = sum; start = i - WINDOW + 1; }
  }
  return start;
}

function tokensView(tokens, raw, scale, whole) {
  const q = shown(raw);
  if (whole || tokens.length <= CROP) return tokenSpans(tokens, q, scale, 0, tokens.length);
  const start = strongest(q), end = Math.min(tokens.length, start + WINDOW);
  return (start > 0 ? '… ' : '') + tokenSpans(tokens, q, scale, start, end) + (end < tokens.length ? ' …' : '')
    + `<button type="button" class="whole">show all ${tokens.length} tokens</button>`;
}

function textView(text, whole) {
  if (whole || text.length <= TEXT) return esc(text);
  return esc(text.slice(0, TEXT)) + ` …<button type="button" class="whole">show all ${text.length} characters</button>`;
}

function heatmap(view, ids, what, tail = 'top') {
  const k = ids.length, rows = view.rows.length, cells = unpack(view.cells, 16);
  let out = `<div class="heat" style="grid-template-columns:minmax(60px,max-content) repeat(${k},minmax(3px,24px))">`;
  for (let r = rows - 1; r >= 0; r--) {  // bottom layer last
    out += `<div class="row" title="${esc(view.rows[r])}">${esc(view.rows[r])}</div>`;
    for (let c = 0; c < k; c++) {
      const n = cells[r * k + c];
      out += `<div style="background:${shade(n)}" title="${esc(view.rows[r])} · ${esc(ids[c])} (#${c + 1}) · ${fmt(n * view.scale)}"></div>`;
    }
  }
  out += '<div></div>' + ids.map((id) => `<div class="col" title="${esc(id)}">${esc(id)}</div>`).join('') + '</div>';
  const which = tail === 'top' ? 'top sequences (columns, by training id, best first)'
    : 'most negative sequences (columns, by training id, most negative first)';
  return `<figure>${out}<figcaption>Influence of each ${what} (rows, bottom to top) on this query, for its ${which}; `
    + 'red raises, blue lowers the completion\'s log-probability; hover a cell for its value.</figcaption></figure>';
}

function rows(i) {
  const [id, group, prompt, completion] = json('queries-data')[i];
  const card = json('card-' + i), sequences = json('sequences');
  const entries = (list) => list.map(([s, score, approximate], r) => ({rank: r + 1, id: sequences[s][0], line: sequences[s][3], score, approximate: !!approximate, text: sequences[s][1]}));
  const out = {query: {id, group, prompt, completion}, top: entries(card.top)};
  if (card.bottom) out.bottom = entries(card.bottom);  // --bottom-k: most negative first
  return out;
}

function entry(card, r) {  // the r-th sequence of a card: its top ones, then its bottom ones
  return r < card.top.length ? card.top[r] : card.bottom[r - card.top.length];
}

function csvCell(v) {
  const s = String(v);
  return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
}

function download(i, kind) {
  const r = rows(i);
  let text, type;
  if (kind === 'csv') {
    const header = ['query_id', 'rank', 'training_id', 'line', 'score', 'approximate', 'text'];  // line: empty where not recorded
    const tails = r.bottom ? [['top', r.top], ['bottom', r.bottom]] : [[null, r.top]];  // a tail column with --bottom-k
    const lines = [(r.bottom ? [...header, 'tail'] : header).join(',')];
    for (const [tail, list] of tails) {
      for (const t of list) lines.push([r.query.id, t.rank, t.id, t.line ?? '', t.score, t.approximate, t.text, ...(tail ? [tail] : [])].map(csvCell).join(','));
    }
    text = lines.join('\n') + '\n'; type = 'text/csv';
  } else {
    text = JSON.stringify(r, null, 1); type = 'application/json';
  }
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([text], {type}));
  a.download = `query-${r.query.id.replace(/[^A-Za-z0-9._-]/g, '_')}.${kind}`;
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function drawCard(details) {
  const i = +details.dataset.q, card = json('card-' + i), sequences = json('sequences');
  const ids = card.top.map(([s]) => sequences[s][0]);
  let out = `<div class="controls"><button type="button" data-download="csv">rows as CSV</button>`
    + `<button type="button" data-download="json">rows as JSON</button></div>`;
  if (card.query) {
    const targets = card.query.filter(([, lp]) => lp !== null), total = targets.reduce((a, [, lp]) => a + lp, 0);
    out += '<div class="qa query-tokens"><b>As scored:</b> ' + card.query.map(([text, lp]) => (lp === null
      ? `<span>${esc(text)}</span>` : `<span class="target" title="log p = ${lp.toFixed(3)} nats">${esc(text)}</span>`)).join('')
      + `<div class="meta">log p(completion | prompt) = ${total.toFixed(3)} nats over ${targets.length} tokens `
      + '(underlined; hover a token for its own)</div></div>';
  }
  if (card.tokens) {
    const scale = card.tokens.scale;
    out += `<div class="scale"><span>token-wise influence, shared scale for this query:</span><span>${fmt(-scale)}</span>`
      + `<span class="bar"></span><span>${fmt(scale)}</span><span>(blue lowers, red raises the completion's log-probability)</span></div>`;
  }
  if (!card.top.length) out += '<p class="note">no training sequence ranked</p>';
  const list = (entries, offset) => entries.map(([s, score, approximate], n) => {
    const [id, text, tokens, line] = sequences[s], r = offset + n;
    const mark = approximate ? '<span class="approx" title="an index score, not rescored exactly">≈ approximate</span> ' : '';
    const q = tokenScores(i, r);
    const body = q && tokens ? tokensView(tokens, q, card.tokens.scale, false) : textView(text, false);
    return `<li data-r="${r}"><span class="meta">#${n + 1} · ${esc(id)} · <span class="line" title="line in the training data file">line ${line ?? '—'}</span> · score ${mark}${fmt(score)}</span>`
      + `<div class="tokens">${body}</div></li>`;
  }).join('');
  if (card.bottom) {  // --bottom-k: the most negative beside the most positive
    out += '<div class="tails"><div><h4>most positive (raise the completion\'s log-probability)</h4>'
      + `<ol class="top">${list(card.top, 0)}</ol></div>`
      + '<div><h4>most negative (lower it), most negative first</h4>'
      + `<ol class="top bottom">${list(card.bottom, card.top.length)}</ol></div></div>`;
  } else {
    out += `<ol class="top">${list(card.top, 0)}</ol>`;
  }
  if (card.layers) out += heatmap(card.layers, ids, 'layer');
  if (card.modules) out += `<details><summary>per module (${card.modules.rows.length} rows)</summary>${heatmap(card.modules, ids, 'module')}</details>`;
  if (card.bottom_layers) out += heatmap(card.bottom_layers, card.bottom.map(([s]) => sequences[s][0]), 'layer', 'bottom');
  details.querySelector('.card').innerHTML = out;
  details.dataset.drawn = '1';
}

function wholeSequence(button) {
  const li = button.closest('li'), details = button.closest('details.query');
  const i = +details.dataset.q, r = +li.dataset.r, card = json('card-' + i);
  const [s] = entry(card, r), [, text, tokens] = json('sequences')[s];
  const q = tokenScores(i, r);
  li.querySelector('.tokens').innerHTML = q && tokens ? tokensView(tokens, q, card.tokens.scale, true) : textView(text, true);
}

const haystacks = [];
function haystack(i) {
  if (haystacks[i] === undefined) {
    const r = rows(i);
    haystacks[i] = [r.query.id, r.query.group, r.query.prompt, r.query.completion, ...[...r.top, ...(r.bottom || [])].map((t) => t.id + ' ' + t.text)].join('\n').toLowerCase();
  }
  return haystacks[i];
}

const LISTED = document.querySelectorAll('table.overview tr[data-q]:not([hidden])').length;  // before "show all"
let listAll = false;
function filter() {
  const words = $('search').value.toLowerCase().split(/\s+/).filter(Boolean);
  const cards = document.querySelectorAll('details.query');
  let shownCount = 0;
  cards.forEach((details) => {
    const i = +details.dataset.q;
    const match = words.every((w) => haystack(i).includes(w));
    details.hidden = !match;
    const row = document.querySelector(`table.overview tr[data-q="${i}"]`);
    if (row) row.hidden = words.length ? !match : !(listAll || i < LISTED);
    shownCount += match;
  });
  $('matches').textContent = words.length ? `${shownCount} of ${cards.length} queries` : '';
}

function openFromHash() {
  const target = location.hash && document.getElementById(decodeURIComponent(location.hash.slice(1)));
  if (target && target.matches('details.query')) { target.open = true; target.scrollIntoView(); }
}

document.addEventListener('toggle', (e) => {
  const d = e.target;
  if (d.matches && d.matches('details.query') && d.open && !d.dataset.drawn) drawCard(d);
}, true);
document.addEventListener('click', (e) => {
  const t = e.target;
  if (t.matches('button.whole')) wholeSequence(t);
  else if (t.dataset && t.dataset.download) download(+t.closest('details.query').dataset.q, t.dataset.download);
});
let timer;
if ($('search')) $('search').addEventListener('input', () => { clearTimeout(timer); timer = setTimeout(filter, 150); });
if ($('expand-all')) {
  $('expand-all').addEventListener('click', () => document.querySelectorAll('details.query:not([hidden])').forEach((d) => { d.open = true; }));
  $('collapse-all').addEventListener('click', () => document.querySelectorAll('details.query').forEach((d) => { d.open = false; }));
  $('predicted').addEventListener('change', () => document.querySelectorAll('details.query[data-drawn]').forEach(drawCard));
}
if ($('show-all')) $('show-all').addEventListener('click', () => { listAll = true; $('show-all').remove(); filter(); });
window.addEventListener('hashchange', openFromHash);
openFromHash();
})();
"""
