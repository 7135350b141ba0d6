/* knowmri web UI: plain JavaScript, no build step. Talks to the JSON API under /api (docs/SERVER.md). */
"use strict";

// ------------------------------------------------------------------ helpers
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

/** Build a DOM element: h("div", {class: "x", onclick: fn}, child, "text", ...). Never uses innerHTML. */
function h(tag, attrs, ...children) {
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

const TOKEN = (() => {
  const fromUrl = new URLSearchParams(location.search).get("token");
  if (fromUrl) sessionStorage.setItem("knowmri-token", fromUrl);
  return fromUrl || sessionStorage.getItem("knowmri-token") || "";
})();

/** A URL with the token appended (for links and EventSource, which cannot send headers). */
function withToken(url) {
  if (!TOKEN) return url;
  return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (TOKEN) headers.Authorization = "Bearer " + TOKEN;
  let body = options.body;
  if (body !== undefined && typeof body !== "string") {
    body = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, {method: options.method || "GET", headers, body, signal: options.signal});
  let data = null;
  try { data = await response.json(); } catch (err) { data = null; }
  if (!response.ok) throw new ApiError(response.status, (data && data.error) || response.statusText);
  return data;
}

let toastTimer = null;
function toast(message) {
  const el = $("#toast");
  el.textContent = message;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, 6000);
}

function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

function fmtSeconds(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "";
  if (s < 1) return Math.max(1, Math.round(s * 1000)) + " ms";
  if (s < 120) return s.toFixed(s < 10 ? 1 : 0) + " s";
  return (s / 60).toFixed(1) + " min";
}

function fmtBytes(b) {
  if (!b) return "";
  if (b < 1 << 20) return Math.ceil(b / 1024) + " KB";
  if (b < 1 << 30) return (b / (1 << 20)).toFixed(1) + " MB";
  return (b / (1 << 30)).toFixed(2) + " GB";
}

function fmtCell(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : (Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : v.toPrecision(4));
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

function fmtTime(t) {
  if (!t) return "";
  return new Date(t * 1000).toLocaleString(undefined, {dateStyle: "short", timeStyle: "medium"});
}

function badge(status) {
  return h("span", {class: "badge status-" + status}, status);
}

function shortText(s, n = 80) {
  s = String(s || "");
  return s.length > n ? s.slice(0, n - 1) + "…" : s;
}

// ------------------------------------------------------------------ state
const KEY_ORDER = ["prompt", "ground_truth", "triple_subject", "triple_relation", "triple_object", "target_new",
  "label", "reasoning", "source_lang", "target_lang", "prompts", "tests"];
const LIST_KEYS = new Set(["prompts", "tests"]);

const state = {
  methods: [],          // /api/methods
  methodInfo: {},       // name -> info
  models: null,         // /api/models
  datasets: [],         // /api/datasets
  mode: "text",         // "text" | "dataset"
  sample: {},           // the editable keys (text mode)
  dataset: null,        // {name, index} (dataset mode)
  recordsOffset: 0,
  matches: [],
  selected: new Set(),
  userTouched: false,   // the user changed the method selection by hand
  runStream: null,
  pollTimer: null,
};

function modelSpec() {
  return $("#model-input").value.trim() || $("#model-select").value;
}

// ------------------------------------------------------------------ router
function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  const view = parts[0] || "diagnose";
  stopStream();
  for (const section of $$(".view")) section.hidden = true;
  for (const link of $$(".topbar nav a")) link.removeAttribute("aria-current");
  const nav = {diagnose: "diagnose", run: "runs", runs: "runs", compare: "compare"}[view] || "diagnose";
  $("#nav-" + nav).setAttribute("aria-current", "page");
  if (view === "run" && parts[1]) { $("#view-run").hidden = false; openRun(parts[1]); }
  else if (view === "runs") { $("#view-runs").hidden = false; loadRuns(); }
  else if (view === "compare") { $("#view-compare").hidden = false; openCompare(parts[1], parts[2]); }
  else { $("#view-diagnose").hidden = false; }
}

// ------------------------------------------------------------------ diagnose: models
async function loadModels() {
  const data = await api("/api/models");
  state.models = data;
  const select = $("#model-select");
  select.replaceChildren();
  if (data.registered.length) {
    select.append(h("optgroup", {label: "Loaded in this server"},
      data.registered.map((m) => h("option", {value: m.name}, `${m.name} (${m.architecture || "model"}, ${m.n_layers ?? "?"} layers)`))));
  }
  select.append(h("optgroup", {label: "Presets"},
    data.presets.map((p) => h("option", {value: p.name, disabled: !p.installed}, p.installed ? `${p.name} — ${p.title}` : `${p.name} (not installed)`))));
  if (data.local.length) {
    select.append(h("optgroup", {label: "Local folders"}, data.local.map((path) => h("option", {value: path}, path))));
  }
  if (data.default) select.value = data.default;
  $("#model-hint").textContent = data.roots.length ? "Local folders are allowed under: " + data.roots.join(", ") : "";
}

// ------------------------------------------------------------------ diagnose: free text
const parseText = debounce(async () => {
  const text = $("#free-text").value;
  if (!text.trim()) { state.sample = {}; renderKeys(); requestMatch(); return; }
  try {
    const data = await api("/api/parse", {method: "POST", body: {text}});
    state.sample = data.sample;
    renderKeys();
    $("#parse-missing").textContent = data.missing.length ? "Not found in the text: " + data.missing.join(", ") + " (add them if you know them)." : "";
    requestMatch();
  } catch (err) {
    $("#parse-missing").textContent = err.message;
  }
}, 350);

function renderKeys() {
  const box = $("#parsed-keys");
  box.replaceChildren();
  const keys = Object.keys(state.sample).sort((a, b) => (KEY_ORDER.indexOf(a) + 99) % 99 - (KEY_ORDER.indexOf(b) + 99) % 99);
  for (const key of keys) {
    const value = state.sample[key];
    const id = "key-" + key;
    const input = h("input", {id, type: "text", value: LIST_KEYS.has(key) ? value.join(" | ") : value, maxlength: 2000,
      "aria-describedby": LIST_KEYS.has(key) ? "list-hint" : null,
      oninput: (e) => {
        const v = e.target.value;
        if (LIST_KEYS.has(key)) state.sample[key] = v.split("|").map((x) => x.trim()).filter(Boolean);
        else state.sample[key] = v;
        requestMatch();
      }});
    const remove = h("button", {type: "button", class: "icon", "aria-label": "Remove " + key,
      onclick: () => { delete state.sample[key]; renderKeys(); requestMatch(); }}, "×");
    box.append(h("div", {class: "key-row"}, h("label", {for: id}, key.replace(/_/g, " ")), input, remove));
  }
  const addSelect = $("#add-key-select");
  addSelect.replaceChildren(...KEY_ORDER.filter((k) => !(k in state.sample)).map((k) => h("option", {value: k}, k)));
}

function addKey() {
  const key = $("#add-key-select").value;
  if (!key) return;
  state.sample[key] = LIST_KEYS.has(key) ? [] : "";
  renderKeys();
  $("#key-" + key).focus();
}

function textSample() {
  const out = {};
  for (const [key, value] of Object.entries(state.sample)) {
    if (Array.isArray(value) ? value.length : String(value).trim()) out[key] = value;
  }
  return out;
}

// ------------------------------------------------------------------ diagnose: datasets
async function loadDatasets() {
  state.datasets = await api("/api/datasets");
  const select = $("#dataset-select");
  select.replaceChildren(...state.datasets.map((d) => h("option", {value: d.name}, `${d.name} (${d.size} records)`)));
}

async function chooseDataset(name, index = 0) {
  $("#dataset-select").value = name;
  const info = state.datasets.find((d) => d.name === name);
  $("#dataset-info").textContent = info ? `${info.description || ""} Keys: ${(info.keys || []).join(", ")}` : "";
  state.dataset = {name, index};
  state.recordsOffset = Math.floor(index / 10) * 10;
  await loadRecords();
  requestMatch();
}

async function loadRecords() {
  const {name, index} = state.dataset;
  const data = await api(`/api/datasets/${encodeURIComponent(name)}/records?offset=${state.recordsOffset}&limit=10`);
  const rows = data.records.map((r) => {
    const id = "record-" + r.index;
    const radio = h("input", {type: "radio", name: "record", id, value: r.index, checked: r.index === index,
      onchange: () => { state.dataset.index = r.index; requestMatch(); }});
    return h("tr", {class: r.index === index ? "selected" : null},
      h("td", {}, radio), h("td", {}, h("label", {for: id}, shortText(r.sample.prompt, 90))),
      h("td", {}, shortText(r.sample.ground_truth || r.sample.label || "", 30)));
  });
  $("#records").replaceChildren(h("table", {class: "data records-table"},
    h("caption", {class: "visually-hidden"}, `Records of ${name}`),
    h("thead", {}, h("tr", {}, h("th", {scope: "col"}, "#"), h("th", {scope: "col"}, "Prompt"), h("th", {scope: "col"}, "Answer"))),
    h("tbody", {onchange: (e) => { for (const tr of $$("#records tr")) tr.classList.toggle("selected", tr.contains(e.target) && e.target.checked); }}, rows)));
  const last = Math.min(data.total, data.offset + data.limit);
  $("#records-page").textContent = `${data.total ? data.offset + 1 : 0}–${last} of ${data.total}`;
  $("#records-prev").disabled = data.offset === 0;
  $("#records-next").disabled = last >= data.total;
}

async function runSuggest() {
  const text = $("#suggest-input").value.trim();
  if (!text) return;
  const box = $("#suggestions");
  box.replaceChildren(h("p", {class: "hint"}, "Searching…"));
  try {
    const data = await api("/api/suggest?k=5&text=" + encodeURIComponent(text));
    box.replaceChildren(
      h("p", {class: "hint"}, `Nearest datasets (${data.backend}): `,
        data.datasets.map((d) => h("button", {type: "button", class: "chip", onclick: () => chooseDataset(d.name, 0)}, d.name))),
      h("ol", {class: "suggestions"}, data.records.map((r) => h("li", {},
        h("button", {type: "button", class: "link", onclick: () => chooseDataset(r.dataset, r.index)},
          `${r.dataset} #${r.index}: ${shortText(r.sample.prompt, 70)}`), h("span", {class: "hint"}, ` ${r.score.toFixed(2)}`)))));
  } catch (err) {
    box.replaceChildren(h("p", {class: "hint"}, err.message));
  }
}

function setMode(mode) {
  state.mode = mode;
  $("#tab-text").setAttribute("aria-selected", String(mode === "text"));
  $("#tab-dataset").setAttribute("aria-selected", String(mode === "dataset"));
  $("#panel-text").hidden = mode !== "text";
  $("#panel-dataset").hidden = mode !== "dataset";
  if (mode === "dataset" && !state.dataset && state.datasets.length) chooseDataset(state.datasets[0].name, 0);
  else requestMatch();
}

// ------------------------------------------------------------------ diagnose: matching
function inputBody() {
  if (state.mode === "dataset") return state.dataset ? {dataset: state.dataset.name, index: state.dataset.index} : null;
  const sample = textSample();
  return sample.prompt ? {sample} : null;
}

let matchSeq = 0;
const requestMatch = debounce(async () => {
  const body = inputBody();
  const seq = ++matchSeq;
  if (!body) {
    state.matches = [];
    renderMethods();
    $("#match-status").textContent = state.mode === "text" ? "Type an input (with a prompt) to see which methods apply." : "Choose a record.";
    return;
  }
  const model = modelSpec();
  $("#match-status").textContent = "Matching methods…";
  let data;
  try {
    data = await api("/api/match", {method: "POST", body: Object.assign({model: model || null}, body)});
    $("#model-hint").textContent = "";
  } catch (err) {
    if (seq !== matchSeq) return;
    if (model && err.status === 400 && /model|preset|folder|root|hub/i.test(err.message)) {
      $("#model-hint").textContent = err.message;
      try { data = await api("/api/match", {method: "POST", body}); } catch (err2) { $("#match-status").textContent = err2.message; return; }
    } else {
      $("#match-status").textContent = err.message;
      return;
    }
  }
  if (seq !== matchSeq) return;
  state.matches = data.matches;
  const eligible = data.matches.filter((m) => m.eligible).map((m) => m.name);
  if (!state.userTouched) state.selected = new Set(eligible);
  for (const name of Array.from(state.selected)) if (!eligible.includes(name)) state.selected.delete(name);
  $("#match-status").textContent = `${eligible.length} of ${data.matches.length} methods apply` + (model ? ` to ${model}.` : ".");
  renderMethods();
}, 250);

function groupByPath(matches) {
  const groups = new Map();
  for (const m of matches) {
    const top = m.path[0] || "Other";
    const sub = m.path.slice(1).join(" / ") || "—";
    if (!groups.has(top)) groups.set(top, new Map());
    const inner = groups.get(top);
    if (!inner.has(sub)) inner.set(sub, []);
    inner.get(sub).push(m);
  }
  return groups;
}

function renderMethods() {
  const box = $("#method-groups");
  box.replaceChildren();
  for (const [top, inner] of groupByPath(state.matches)) {
    const section = h("section", {class: "method-group", "aria-label": top}, h("h3", {}, top));
    for (const [sub, items] of inner) {
      section.append(h("h4", {}, sub));
      for (const m of items) section.append(methodRow(m));
    }
    box.append(section);
  }
  updateEstimate();
}

function methodRow(m) {
  const id = "method-" + m.name;
  const info = state.methodInfo[m.name] || {};
  const box = h("input", {type: "checkbox", id, value: m.name, disabled: !m.eligible, checked: m.eligible && state.selected.has(m.name),
    onchange: (e) => { state.userTouched = true; if (e.target.checked) state.selected.add(m.name); else state.selected.delete(m.name); updateEstimate(); }});
  const est = m.estimate && !m.estimate.error ? h("span", {class: "estimate", title: `${m.estimate.forward_passes || 0} forward, ${m.estimate.backward_passes || 0} backward passes; ${fmtBytes(m.estimate.memory_bytes)}`}, "≈ " + fmtSeconds(m.estimate.seconds)) : null;
  const row = h("div", {class: "method" + (m.eligible ? "" : " ineligible"), dataset: {method: m.name}},
    h("div", {class: "method-head"}, box, h("label", {for: id}, h("span", {class: "method-title"}, m.title), " ", h("code", {}, m.name)), est));
  if (!m.eligible) row.append(h("p", {class: "reasons"}, "Does not apply: " + m.reasons.join("; ")));
  else if (info.params && info.params.length) row.append(paramsForm(m.name, info.params));
  if (info.description) row.title = info.description;
  return row;
}

function paramsForm(method, schema) {
  const fields = schema.map((p) => {
    const id = `param-${method}-${p.name}`;
    let input;
    if (p.choices) input = h("select", {id}, p.choices.map((c) => h("option", {value: c, selected: c === p.default}, String(c))));
    else if (p.type === "bool") input = h("input", {id, type: "checkbox", checked: !!p.default});
    else if (p.type === "int" || p.type === "float") input = h("input", {id, type: "number", step: p.type === "int" ? "1" : "any", value: p.default});
    else input = h("input", {id, type: "text", value: Array.isArray(p.default) ? p.default.join(",") : (p.default ?? "")});
    input.dataset.param = p.name;
    input.dataset.type = p.type;
    return h("div", {class: "param"}, h("label", {for: id, title: p.help || ""}, p.name), input, p.help ? h("small", {}, p.help) : null);
  });
  return h("details", {class: "params"}, h("summary", {}, "Parameters"), h("div", {class: "param-grid"}, fields));
}

function collectParams(methods) {
  const out = {};
  for (const name of methods) {
    const schema = (state.methodInfo[name] || {}).params || [];
    for (const p of schema) {
      const el = document.getElementById(`param-${name}-${p.name}`);
      if (!el) continue;
      let value;
      if (el.type === "checkbox") value = el.checked;
      else if (p.type === "int") value = el.value === "" ? p.default : parseInt(el.value, 10);
      else if (p.type === "float") value = el.value === "" ? p.default : parseFloat(el.value);
      else if (p.type === "list" || p.type === "tuple") value = el.value.split(",").map((s) => s.trim()).filter(Boolean);
      else value = el.value === "" && p.default === null ? null : el.value;
      if (JSON.stringify(value) !== JSON.stringify(Array.isArray(p.default) ? p.default : p.default)) {
        (out[name] = out[name] || {})[p.name] = value;
      }
    }
  }
  return out;
}

function updateEstimate() {
  let total = 0;
  let any = false;
  for (const m of state.matches) {
    if (state.selected.has(m.name) && m.estimate && m.estimate.seconds !== undefined) { total += m.estimate.seconds; any = true; }
  }
  $("#run-estimate").textContent = state.selected.size ? `${state.selected.size} selected` + (any ? `, ≈ ${fmtSeconds(total)}` : "") : "";
  $("#run-btn").disabled = state.selected.size === 0;
}

async function startRun() {
  const body = inputBody();
  if (!body) { toast(state.mode === "text" ? "Type an input first." : "Choose a record first."); return; }
  const model = modelSpec();
  if (!model) { toast("Choose a model first."); return; }
  const methods = state.matches.filter((m) => m.eligible && state.selected.has(m.name)).map((m) => m.name);
  if (!methods.length) { toast("Select at least one method."); return; }
  const button = $("#run-btn");
  button.disabled = true;
  try {
    const data = await api("/api/runs", {method: "POST", body: Object.assign({model, methods, params: collectParams(methods)}, body)});
    location.hash = "#/run/" + data.id;
  } catch (err) {
    toast(err.message);
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------ one run
function stopStream() {
  if (state.runStream) { state.runStream.close(); state.runStream = null; }
  if (state.pollTimer) { clearTimeout(state.pollTimer); state.pollTimer = null; }
}

async function openRun(id) {
  $("#run-title").textContent = "Run " + id;
  $("#run-report").replaceChildren();
  $("#run-error").hidden = true;
  $("#progress-card").hidden = true;
  $("#export-html").href = withToken(`/api/runs/${id}/report.html?download=1`);
  $("#export-json").href = withToken(`/api/runs/${id}/report.json?download=1`);
  let run;
  try {
    run = await api(`/api/runs/${id}`);
  } catch (err) {
    $("#run-status").replaceChildren();
    showRunError(err.message);
    return;
  }
  fillCompareWith(id);
  showRun(run);
  if (run.status === "queued" || run.status === "running") follow(id);
}

function showRunError(message) {
  const box = $("#run-error");
  box.hidden = false;
  box.replaceChildren(h("h2", {}, "The run failed"), h("p", {}, message));
}

function showRun(run) {
  $("#run-status").replaceChildren(badge(run.status));
  const done = run.status === "done";
  for (const el of [$("#export-html"), $("#export-json")]) el.classList.toggle("disabled", !done);
  if (run.status === "error") { $("#progress-card").hidden = true; showRunError(run.error || "unknown error"); }
  if (run.status === "queued" || run.status === "running") showProgress(run);
  if (done || run.status === "error") health();
  if (done && run.report) {
    $("#progress-card").hidden = true;
    renderReport($("#run-report"), run.report, run);
  }
}

function showProgress(run) {
  const p = run.progress || {};
  $("#progress-card").hidden = false;
  $("#run-status").replaceChildren(badge(run.status));
  $("#run-progress").value = p.fraction || 0;
  $("#progress-message").textContent = run.status === "queued" ? "Queued: waiting for the model worker…"
    : [p.method, p.message].filter(Boolean).join(": ") || p.stage || "";
  const list = $("#progress-methods");
  list.replaceChildren(...Object.entries(p.methods || {}).map(([name, status]) =>
    h("li", {class: "status-" + status}, badge(status), " ", name)));
}

function follow(id) {
  stopStream();
  const onEnd = async () => {
    stopStream();
    try { showRun(await api(`/api/runs/${id}`)); } catch (err) { showRunError(err.message); }
  };
  if (window.EventSource) {
    const source = new EventSource(withToken(`/api/runs/${id}/events`));
    state.runStream = source;
    source.addEventListener("progress", (e) => {
      const data = JSON.parse(e.data);
      if (data.status === "queued" || data.status === "running") showProgress(data);
    });
    source.addEventListener("done", onEnd);
    source.addEventListener("error", (e) => {
      if (e.data) { onEnd(); return; }           // the run's own error event
      if (source.readyState === EventSource.CLOSED) { state.runStream = null; poll(id); }
    });
  } else {
    poll(id);
  }
}

function poll(id) {
  state.pollTimer = setTimeout(async () => {
    try {
      const run = await api(`/api/runs/${id}?report=false`);
      if (run.status === "queued" || run.status === "running") { showProgress(run); poll(id); }
      else showRun(await api(`/api/runs/${id}`));
    } catch (err) { showRunError(err.message); }
  }, 1000);
}

async function fillCompareWith(id) {
  const select = $("#compare-with");
  try {
    const data = await api("/api/runs?status=done&limit=100");
    select.replaceChildren(h("option", {value: ""}, "Compare with…"),
      ...data.runs.filter((r) => r.id !== id).map((r) => h("option", {value: r.id}, runLabel(r))));
  } catch (err) { /* the list is optional */ }
  select.onchange = () => { if (select.value) location.hash = `#/compare/${id}/${select.value}`; };
}

function runLabel(r) {
  return `${fmtTime(r.created)} · ${r.model} · ${shortText((r.sample || {}).prompt, 40)}`;
}

// ------------------------------------------------------------------ report rendering
function renderReport(container, report, run) {
  container.replaceChildren();
  const model = report.model || {};
  const sample = report.sample || {};
  const results = report.results || {};
  const names = Object.keys(results);
  const head = h("section", {class: "card report-head"},
    h("div", {class: "report-meta"},
      h("div", {}, h("h2", {}, "Input"), keyTable(sample)),
      h("div", {}, h("h2", {}, "Model"), keyTable({name: model.name, architecture: model.architecture, layers: model.n_layers,
        d_model: model.d_model, kind: model.kind}),
        run ? h("p", {class: "hint"}, `Run ${run.id}, ${fmtTime(run.created)}` + (run.finished && run.started ? `, took ${fmtSeconds(run.finished - run.started)}` : "")) : null)),
    h("nav", {class: "jump", "aria-label": "Methods in this report"},
      h("a", {href: "#", onclick: jumpTo(container, ".consensus")}, "Consensus"),
      names.map((n) => h("a", {href: "#", onclick: jumpTo(container, `[data-method="${n}"]`)}, results[n].method || n, " ", badge(results[n].status)))));
  container.append(head, renderConsensus(report.consensus || {}, results));
  for (const name of names) container.append(renderResult(name, results[name]));
  drawFigures(container);
}

function jumpTo(container, selector) {
  return (e) => { e.preventDefault(); const el = container.querySelector(selector); if (el) el.scrollIntoView({behavior: "smooth", block: "start"}); };
}

function keyTable(obj) {
  const rows = Object.entries(obj).filter(([, v]) => v !== undefined && v !== null && v !== "");
  return h("table", {class: "kv"}, h("tbody", {}, rows.map(([k, v]) =>
    h("tr", {}, h("th", {scope: "row"}, k.replace(/_/g, " ")), h("td", {}, Array.isArray(v) ? v.join(" | ") : fmtCell(v))))));
}

function dataTable(table, limit = 25) {
  const rows = table.rows || [];
  const body = h("tbody");
  const fill = (n) => body.replaceChildren(...rows.slice(0, n).map((r) => h("tr", {}, r.map((c) => h("td", {class: typeof c === "number" ? "num" : null}, fmtCell(c))))));
  fill(limit);
  const more = rows.length > limit ? h("button", {type: "button", class: "link", onclick: (e) => { fill(rows.length); e.target.remove(); }}, `Show all ${rows.length} rows`) : null;
  return h("div", {class: "table-block"},
    h("div", {class: "table-wrap"}, h("table", {class: "data"}, h("caption", {}, table.name || ""),
      h("thead", {}, h("tr", {}, (table.columns || []).map((c) => h("th", {scope: "col"}, c)))), body)), more);
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
  for (const [i, fig] of (consensus.figures || []).entries()) box.append(figureBlock("consensus", i, fig));
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
      return [k, Array.isArray(v) ? v.map(fmtCell).join(", ") : (typeof v === "object" && v !== null ? JSON.stringify(v) : v)];
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
  for (const [i, fig] of (r.figures || []).entries()) figs.append(figureBlock(name, i, fig));
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

function figureBlock(owner, i, fig) {
  const plotly = fig.plotly || {};
  const {rows, cols} = heatmapShape(plotly);
  const div = h("div", {class: "figure", role: "img", "aria-label": fig.name || `figure ${i + 1}`});
  div._figure = plotly;
  div._height = (plotly.layout || {}).height || (rows ? Math.min(900, Math.max(360, 120 + rows * 20)) : 380);
  const wide = cols > 14 || rows > 14;
  return h("figure", {class: "figure-block" + (wide ? " wide" : "")}, div, h("figcaption", {}, fig.name || ""));
}

let plotlyLoading = null;
/** Plotly's bundle (served by the package, no CDN), loaded on first use so the input view opens fast. */
function loadPlotly() {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  if (!plotlyLoading) {
    plotlyLoading = new Promise((resolve, reject) => {
      const script = h("script", {src: "/static/plotly.min.js"});
      script.onload = () => resolve(window.Plotly);
      script.onerror = () => { plotlyLoading = null; reject(new Error("Plotly failed to load")); };
      document.head.append(script);
    });
  }
  return plotlyLoading;
}

async function drawFigures(container) {
  const targets = $$(".figure", container);
  if (!targets.length) return;
  try { await loadPlotly(); } catch (err) { for (const el of targets) el.textContent = err.message; return; }
  for (const el of targets) {
    if (!el.isConnected) continue;
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

// ------------------------------------------------------------------ runs list
async function loadRuns() {
  let data;
  try { data = await api("/api/runs?limit=200"); } catch (err) { toast(err.message); return; }
  const body = $("#runs-table tbody");
  const checked = new Set($$("#runs-table input[type=checkbox]:checked").map((c) => c.value));
  body.replaceChildren(...data.runs.map((r) => {
    const done = r.status === "done";
    const box = h("input", {type: "checkbox", value: r.id, id: "pick-" + r.id, disabled: !done, checked: checked.has(r.id),
      "aria-label": "Select run " + r.id + " for comparison", onchange: updateCompareButton});
    const input = r.input || {};
    const what = input.dataset ? `${input.dataset} #${input.index}: ` : "";
    return h("tr", {dataset: {run: r.id}},
      h("td", {}, box), h("td", {}, badge(r.status), r.status === "running" && r.progress ? ` ${Math.round((r.progress.fraction || 0) * 100)}%` : ""),
      h("td", {}, fmtTime(r.created)), h("td", {}, r.model), h("td", {class: "prompt"}, what + shortText((r.sample || {}).prompt, 70)),
      h("td", {}, (r.methods || ["all eligible"]).join(", ")),
      h("td", {class: "actions"},
        h("a", {href: "#/run/" + r.id, class: "button small"}, "Open"),
        done ? h("a", {href: withToken(`/api/runs/${r.id}/report.html?download=1`), class: "button small secondary"}, "HTML") : null,
        done ? h("a", {href: withToken(`/api/runs/${r.id}/report.json?download=1`), class: "button small secondary"}, "JSON") : null,
        r.status === "done" || r.status === "error" ? h("button", {type: "button", class: "small link", "aria-label": "Delete run " + r.id,
          onclick: () => deleteRun(r.id)}, "Delete") : null));
  }));
  $("#runs-empty").hidden = data.runs.length > 0;
  updateCompareButton();
  if (data.runs.some((r) => r.status === "running" || r.status === "queued")) {
    state.pollTimer = setTimeout(() => { if (!$("#view-runs").hidden) loadRuns(); }, 2000);
  }
}

async function deleteRun(id) {
  if (!confirm(`Delete run ${id}?`)) return;
  try { await api(`/api/runs/${id}`, {method: "DELETE"}); loadRuns(); } catch (err) { toast(err.message); }
}

function updateCompareButton() {
  const picked = $$("#runs-table input[type=checkbox]:checked").map((c) => c.value);
  const button = $("#compare-btn");
  button.disabled = picked.length !== 2;
  button.onclick = () => { if (picked.length === 2) location.hash = `#/compare/${picked[0]}/${picked[1]}`; };
}

// ------------------------------------------------------------------ compare
async function openCompare(a, b) {
  let data;
  try { data = await api("/api/runs?status=done&limit=200"); } catch (err) { toast(err.message); return; }
  const runs = data.runs;
  a = a || (runs[1] && runs[1].id);
  b = b || (runs[0] && runs[0].id);
  for (const [sel, value] of [["#compare-a", a], ["#compare-b", b]]) {
    const select = $(sel);
    select.replaceChildren(h("option", {value: ""}, "Choose a run…"), ...runs.map((r) => h("option", {value: r.id}, runLabel(r))));
    select.value = value || "";
    select.onchange = () => { location.hash = `#/compare/${$("#compare-a").value}/${$("#compare-b").value}`; };
  }
  const panes = [["#compare-left", a], ["#compare-right", b]];
  const loaded = [];
  for (const [sel, id] of panes) {
    const pane = $(sel);
    pane.replaceChildren();
    if (!id) { pane.append(h("p", {class: "hint"}, "Choose a finished run.")); loaded.push(null); continue; }
    try {
      const run = await api(`/api/runs/${id}`);
      if (run.report) renderReport(pane, run.report, run);
      else pane.append(h("p", {class: "hint"}, `Run ${id} is ${run.status}.`));
      loaded.push(run);
    } catch (err) {
      pane.append(h("p", {class: "error-text"}, err.message));
      loaded.push(null);
    }
  }
  renderDiff(loaded[0], loaded[1]);
}

/** A short side-by-side summary: per method, status and headline findings of both runs. */
function renderDiff(left, right) {
  const box = $("#compare-diff");
  if (!left || !right || !left.report || !right.report) { box.hidden = true; return; }
  const lr = left.report.results || {};
  const rr = right.report.results || {};
  const names = Array.from(new Set([...Object.keys(lr), ...Object.keys(rr)]));
  const headline = (r) => {
    if (!r) return "—";
    const f = r.findings || {};
    if (f.first_top1_layer !== undefined && f.first_top1_layer !== null) return `${r.status}; answer top-1 from layer ${f.first_top1_layer}`;
    if (f.token_scores && f.token_scores.length) {
      const best = f.token_scores.reduce((x, y) => (y.score > x.score ? y : x));
      return `${r.status}; top token ${JSON.stringify(best.token)}`;
    }
    return r.status;
  };
  const rows = [["model", left.model, right.model], ["prompt", (left.sample || {}).prompt, (right.sample || {}).prompt],
    ...names.map((n) => [n, headline(lr[n]), headline(rr[n])]),
    ["consensus", (left.report.consensus || {}).verdict || "", (right.report.consensus || {}).verdict || ""]];
  box.hidden = false;
  box.replaceChildren(h("h2", {}, "At a glance"), dataTable({name: "", columns: ["", "left", "right"], rows}, 50));
}

// ------------------------------------------------------------------ start
async function health() {
  try {
    const data = await api("/api/health");
    const w = data.worker;
    $("#server-status").textContent = `v${data.version} · ${data.runs} run${data.runs === 1 ? "" : "s"}` + (w.current ? " · running a job" : "") + (w.queued ? ` · ${w.queued} queued` : "");
  } catch (err) {
    $("#server-status").textContent = err.status === 401 ? "token needed" : "server unreachable";
  }
}

async function init() {
  $("#free-text").addEventListener("input", parseText);
  $("#add-key-btn").addEventListener("click", addKey);
  $("#model-select").addEventListener("change", () => { $("#model-input").value = ""; requestMatch(); });
  $("#model-input").addEventListener("change", requestMatch);  // on Enter or leaving the field: loading is costly
  $("#tab-text").addEventListener("click", () => setMode("text"));
  $("#tab-dataset").addEventListener("click", () => setMode("dataset"));
  $("#dataset-select").addEventListener("change", (e) => chooseDataset(e.target.value, 0));
  $("#records-prev").addEventListener("click", () => { state.recordsOffset = Math.max(0, state.recordsOffset - 10); loadRecords(); });
  $("#records-next").addEventListener("click", () => { state.recordsOffset += 10; loadRecords(); });
  $("#suggest-btn").addEventListener("click", runSuggest);
  $("#suggest-input").addEventListener("keydown", (e) => { if (e.key === "Enter") runSuggest(); });
  $("#select-all-btn").addEventListener("click", () => { state.userTouched = true; state.selected = new Set(state.matches.filter((m) => m.eligible).map((m) => m.name)); renderMethods(); });
  $("#select-none-btn").addEventListener("click", () => { state.userTouched = true; state.selected = new Set(); renderMethods(); });
  $("#run-btn").addEventListener("click", startRun);
  window.addEventListener("hashchange", route);
  renderKeys();
  updateEstimate();
  try {
    const [methods] = await Promise.all([api("/api/methods"), loadModels(), loadDatasets()]);
    state.methods = methods;
    for (const m of methods) state.methodInfo[m.name] = m;
  } catch (err) {
    toast(err.status === 401 ? "This server needs a token: open the URL printed by `knowmri serve` (with ?token=…)." : err.message);
  }
  health();
  setInterval(health, 15000);
  route();
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", init);
