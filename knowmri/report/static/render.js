/* knowmri report renderer: draws one report.json (input, model, consensus, every method's summary,
 * figures and tables, a dataset run's samples) into a container.
 *
 * The one renderer of a report: the web UI imports it as an ES module, and the saved index.html
 * inlines it (report/html.py) so the page stays one offline file. So it imports nothing, builds the
 * DOM without innerHTML (report strings are only ever text), and must never contain an HTML
 * comment opener or a closing script tag, even inside strings or comments (html.py checks). */

/** Build a DOM element: h("div", {class: "x", onclick: fn}, child, "text", ...). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function fmtSeconds(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "";
  if (s < 1) return Math.max(1, Math.round(s * 1000)) + " ms";
  if (s < 120) return s.toFixed(s < 10 ? 1 : 0) + " s";
  return (s / 60).toFixed(1) + " min";
}

export function fmtCell(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : (Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : v.toPrecision(4));
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

export function fmtTime(t) {
  if (!t) return "";
  return new Date(t * 1000).toLocaleString(undefined, {dateStyle: "short", timeStyle: "medium"});
}

export function badge(status) {
  return h("span", {class: "badge status-" + status}, status);
}

/** A two-column table of an object's fields (lists joined, objects as JSON). */
export function keyTable(obj) {
  const rows = Object.entries(obj).filter(([, v]) => v !== undefined && v !== null && v !== "");
  return h("table", {class: "kv"}, h("tbody", {}, rows.map(([k, v]) =>
    h("tr", {}, h("th", {scope: "row"}, k.replace(/_/g, " ")), h("td", {}, Array.isArray(v) ? v.join(" | ") : fmtCell(v))))));
}

/** A report table ({name, columns, rows}): the first `limit` rows, and a button that shows them all. */
export function dataTable(table, limit = 25) {
  const rows = table.rows || [];
  const body = h("tbody");
  const fill = (n) => body.replaceChildren(...rows.slice(0, n).map((r) => h("tr", {}, r.map((c) => h("td", {class: typeof c === "number" ? "num" : null}, fmtCell(c))))));
  fill(limit);
  const more = rows.length > limit ? h("button", {type: "button", class: "link", onclick: (e) => { fill(rows.length); e.target.remove(); }}, `Show all ${rows.length} rows`) : null;
  return h("div", {class: "table-block"},
    h("div", {class: "table-wrap"}, h("table", {class: "data"}, h("caption", {}, table.name || ""),
      h("thead", {}, h("tr", {}, (table.columns || []).map((c) => h("th", {scope: "col"}, c)))), body)), more);
}

/**
 * Render `report` (report.json's structure) into `container`, replacing its content, then draw the figures.
 * options.run: the web UI's run record (its id and times are shown); options.plotly: a function giving
 * a promise of Plotly (default: the page's window.Plotly); options.sampleHref: for a dataset report, a
 * function giving the link that opens one record's own report from its row of the samples table (default:
 * the record's saved file, `samples/000007.json`, relative to the run directory's index.html).
 */
export function renderReport(container, report, options = {}) {
  container.replaceChildren();
  const model = report.model || {};
  const sample = report.sample || {};
  const results = report.results || {};
  const consensus = report.consensus || {};
  const run = options.run;
  const cards = Object.entries(results).map(([name, r]) => [name, r, renderResult(name, r)]);
  const hasConsensus = Object.keys(consensus).length > 0;
  const consensusCard = hasConsensus ? renderConsensus(consensus, results) : null;
  const sampleHref = options.sampleHref || ((s) => s.file || null);
  const samplesCard = Array.isArray(report.samples) && report.samples.length ? renderSamples(report.samples, Object.keys(results), sampleHref) : null;
  const notes = [];
  if (run) notes.push(`Run ${run.id}, ${fmtTime(run.created)}` + (run.finished && run.started ? `, took ${fmtSeconds(run.finished - run.started)}` : ""));
  if (report.knowmri_version) notes.push(`knowmri ${report.knowmri_version}`);
  const head = h("section", {class: "card report-head"},
    h("div", {class: "report-meta"},
      h("div", {}, h("h2", {}, "Input"), keyTable(sample)),
      h("div", {}, h("h2", {}, "Model"), keyTable({name: model.name, architecture: model.architecture, layers: model.n_layers,
        d_model: model.d_model, kind: model.kind}),
        notes.length ? h("p", {class: "hint"}, notes.join(" · ")) : null)),
    h("nav", {class: "jump", "aria-label": "Methods in this report"},
      consensusCard ? h("a", {href: "#", onclick: jumpTo(consensusCard)}, "Consensus") : null,
      cards.map(([name, r, card]) => h("a", {href: "#", onclick: jumpTo(card)}, r.method || name, " ", badge(r.status))),
      samplesCard ? h("a", {href: "#", onclick: jumpTo(samplesCard)}, "Samples") : null));
  container.append(head);
  if (consensusCard) container.append(consensusCard);
  for (const [, , card] of cards) container.append(card);
  if (samplesCard) container.append(samplesCard);
  return drawFigures(container, options.plotly);
}

function jumpTo(target) {
  return (e) => { e.preventDefault(); target.scrollIntoView({behavior: "smooth", block: "start"}); };
}

/** The consensus: its verdict, its own tables (and figures); the raw data behind them in a details block. */
function renderConsensus(consensus, results) {
  const box = h("section", {class: "card consensus", id: "consensus", "aria-labelledby": "consensus-title"},
    h("h2", {id: "consensus-title"}, "Consensus"));
  if (consensus.error) box.append(h("p", {class: "error-text"}, consensus.error));
  box.append(h("p", {class: "verdict"}, consensus.verdict || "No cross-method finding for this run (a single method, or none with comparable findings)."));
  const own = consensus.tables || [];
  const raw = Object.entries(consensus).filter(([key, value]) => !["verdict", "error", "tables", "figures", "methods"].includes(key) && value !== null);
  let tables = own;
  if (!own.length) {   // an older or smaller consensus: tabulate its fields
    const tokenOf = {};
    for (const r of Object.values(results)) for (const s of ((r.findings || {}).token_scores || [])) tokenOf[s.index] = s.token;
    tables = raw.map(([key, value]) => toTable(key, value, tokenOf)).filter((t) => t && t.rows.length);
  }
  const grid = h("div", {class: "consensus-grid"});
  for (const t of tables) grid.append(dataTable(t, 15));
  box.append(grid);
  for (const [i, fig] of (consensus.figures || []).entries()) box.append(figureBlock(i, fig));
  if (own.length && raw.length) {
    box.append(h("details", {class: "findings"}, h("summary", {}, "Consensus data (JSON)"),
      h("pre", {}, JSON.stringify(Object.fromEntries(raw), null, 1))));
  }
  return box;
}

function toTable(key, value, tokenOf) {
  const name = key.replace(/_/g, " ");
  if (Array.isArray(value)) {
    if (!value.length) return {name, columns: [], rows: []};
    if (typeof value[0] === "object" && value[0] !== null && !Array.isArray(value[0])) {
      const columns = Array.from(new Set(value.flatMap((v) => Object.keys(v))));
      return {name, columns, rows: value.map((v) => columns.map((c) => Array.isArray(v[c]) ? v[c].join(", ") : v[c]))};
    }
    return {name, columns: ["value"], rows: value.map((v) => [v])};
  }
  if (typeof value === "object") {
    const rows = Object.entries(value).map(([k, v]) => {
      if (Array.isArray(v)) return [k, v.map((i) => (typeof i === "number" && tokenOf[i] !== undefined ? `${JSON.stringify(tokenOf[i])} (${i})` : (typeof i === "object" ? JSON.stringify(i) : fmtCell(i)))).join(", ")];
      return [k, typeof v === "object" && v !== null ? JSON.stringify(v) : v];
    });
    return {name, columns: ["method", "value"], rows};
  }
  return {name, columns: ["value"], rows: [[value]]};
}

function renderResult(name, r) {
  const card = h("section", {class: "card result status-" + r.status, dataset: {method: name}, "aria-label": `${r.method || name} result`},
    h("header", {class: "result-head"},
      h("h2", {}, r.method || name),
      h("span", {class: "path"}, (r.path || []).join(" / ")),
      badge(r.status),
      r.seconds ? h("span", {class: "hint"}, fmtSeconds(r.seconds)) : null));
  if (r.error) card.append(h("p", {class: "error-text"}, r.error));
  if (r.summary) card.append(h("p", {class: "summary"}, r.summary));
  const figs = h("div", {class: "figures"});
  for (const [i, fig] of (r.figures || []).entries()) figs.append(figureBlock(i, fig));
  if ((r.figures || []).length) card.append(figs);
  for (const t of r.tables || []) card.append(dataTable(t));
  if (r.params && Object.keys(r.params).length) card.append(h("details", {}, h("summary", {}, "Parameters"), keyTable(r.params)));
  if (r.findings && Object.keys(r.findings).length) {
    const text = JSON.stringify(r.findings, null, 1);
    card.append(h("details", {class: "findings"}, h("summary", {}, "Findings (JSON)"),
      h("pre", {}, text.length > 20000 ? text.slice(0, 20000) + "\n…" : text)));
  }
  return card;
}

/** Order two cells: numbers by value, text alphabetically; empty cells last whichever the direction. */
function compareCells(a, b, ascending) {
  const empty = (v) => v === undefined || v === null || v === "";
  if (empty(a) || empty(b)) return empty(a) === empty(b) ? 0 : (empty(a) ? 1 : -1);
  const order = typeof a === "number" && typeof b === "number" ? a - b : String(a).localeCompare(String(b), undefined, {numeric: true});
  return ascending ? order : -order;
}

/**
 * A dataset run's samples: one row per record (its prompt, the model's answer and its probability, every
 * method's status, the time, an input error), sortable by any column (click its header, again to reverse),
 * each row opening that record's own report when `sampleHref(record)` gives a link.
 */
function renderSamples(records, methods, sampleHref) {
  const has = (value) => records.some((s) => { const v = value(s); return v !== undefined && v !== null && v !== ""; });
  const columns = [
    {key: "index", label: "#", value: (s) => s.index},
    {key: "prompt", label: "prompt", value: (s) => s.prompt},
    {key: "ground_truth", label: "ground truth", value: (s) => s.ground_truth},
    {key: "answer", label: "answer", value: (s) => s.answer},
    {key: "answer_prob", label: "P(answer)", value: (s) => s.answer_prob},
    ...methods.map((m) => ({key: "status:" + m, label: m, value: (s) => (s.status || {})[m] || "", status: true})),
    {key: "seconds", label: "seconds", value: (s) => s.seconds},
    {key: "error", label: "error", value: (s) => s.error},
  ].filter((c) => c.key === "index" || c.status || has(c.value));
  const state = {key: "index", ascending: true, shown: 100};
  const body = h("tbody");
  const heads = columns.map((c) => h("th", {scope: "col", dataset: {column: c.key}},
    h("button", {type: "button", class: "sort", title: `Sort by ${c.label}`, onclick: () => sortBy(c.key)}, c.label)));
  const more = h("button", {type: "button", class: "link", onclick: () => { state.shown = records.length; fill(); }}, `Show all ${records.length} rows`);
  const cell = (c, s) => {
    const v = c.value(s);
    const href = (c.key === "index" || c.key === "prompt") ? sampleHref(s) : null;
    const content = c.status ? (v ? badge(v) : "") : fmtCell(v);
    return h("td", {class: typeof v === "number" ? "num" : (c.key === "prompt" ? "prompt" : null)},
      href ? h("a", {href, title: `Open record ${s.index}'s own report`}, content) : content);
  };
  function fill() {
    const column = columns.find((c) => c.key === state.key);
    const sorted = records.slice().sort((a, b) => compareCells(column.value(a), column.value(b), state.ascending) || a.index - b.index);
    body.replaceChildren(...sorted.slice(0, state.shown).map((s) => h("tr", {dataset: {index: s.index}}, columns.map((c) => cell(c, s)))));
    heads.forEach((th, i) => th.setAttribute("aria-sort", columns[i].key === state.key ? (state.ascending ? "ascending" : "descending") : "none"));
    more.hidden = records.length <= state.shown;
  }
  function sortBy(key) {
    state.ascending = state.key === key ? !state.ascending : true;
    state.key = key;
    fill();
  }
  fill();
  return h("section", {class: "card samples", "aria-labelledby": "samples-title"},
    h("h2", {id: "samples-title"}, `Samples (${records.length})`),
    h("p", {class: "hint"}, "Click a column's header to sort by it" + (records.some((s) => sampleHref(s)) ? "; a record's number or prompt opens its own report." : ".")),
    h("div", {class: "table-block"}, h("div", {class: "table-wrap"}, h("table", {class: "data samples-table", "aria-label": "Per-sample results"},
      h("thead", {}, h("tr", {}, heads)), body)), more));
}

/** Rows and columns of the largest heatmap in a figure (0 when it has none), to size it. */
function heatmapShape(fig) {
  let rows = 0;
  let cols = 0;
  for (const trace of fig.data || []) {
    if (trace.type === "heatmap" && Array.isArray(trace.z)) {
      rows = Math.max(rows, trace.z.length);
      cols = Math.max(cols, ...trace.z.map((r) => (Array.isArray(r) ? r.length : 0)));
    }
  }
  return {rows, cols};
}

function figureBlock(i, fig) {
  const plotly = fig.plotly || {};
  const {rows, cols} = heatmapShape(plotly);
  const div = h("div", {class: "figure", role: "img", "aria-label": fig.name || `figure ${i + 1}`});
  div._figure = plotly;
  div._height = (plotly.layout || {}).height || (rows ? Math.min(900, Math.max(360, 120 + rows * 20)) : 380);
  const wide = cols > 14 || rows > 14;
  return h("figure", {class: "figure-block" + (wide ? " wide" : "")}, div, h("figcaption", {}, fig.name || ""));
}

function pagePlotly() {
  return window.Plotly ? Promise.resolve(window.Plotly) : Promise.reject(new Error("Plotly is not available on this page"));
}

/** Draw every figure block under `container` with Plotly (from `loadPlotly`, default the page's). */
export async function drawFigures(container, loadPlotly = pagePlotly) {
  const targets = Array.from(container.querySelectorAll(".figure"));
  if (!targets.length) return;
  let Plotly;
  try { Plotly = await loadPlotly(); } catch (err) { for (const el of targets) el.textContent = err.message; return; }
  for (const el of targets) {
    if (!el.isConnected || !el._figure) continue;
    const fig = el._figure;
    const layout = Object.assign({}, fig.layout || {});
    delete layout.width;
    layout.autosize = true;
    layout.height = el._height;
    layout.margin = Object.assign({l: 60, r: 20, t: 40, b: 50}, layout.margin || {});
    try {
      Plotly.newPlot(el, fig.data || [], layout, {responsive: true, displaylogo: false});
    } catch (err) {
      el.textContent = "Could not draw this figure: " + err.message;
    }
  }
}
