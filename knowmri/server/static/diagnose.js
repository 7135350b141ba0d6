/* The Diagnose view: choose a model, type free text or pick a dataset record, see which methods apply
 * (grouped by the taxonomy, with the reasons others do not, and the estimated time), start a run; or run
 * the methods on a dataset's first N records (a dataset run, with its estimate: every record's, added). */

import {api} from "./api.js";
import {fmtSeconds, h} from "./report/render.js";
import {$, $$, debounce, fmtBytes, shortText, toast} from "./ui.js";

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
  scope: "record",      // dataset mode: "record" (the chosen one) | "samples" (the first N, a dataset run)
  recordsOffset: 0,
  matches: [],
  selected: new Set(),
  userTouched: false,   // the user changed the method selection by hand
};

function modelSpec() {
  return $("#model-input").value.trim() || $("#model-select").value;
}

// ------------------------------------------------------------------ models
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

// ------------------------------------------------------------------ free text
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

// ------------------------------------------------------------------ datasets
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

// ------------------------------------------------------------------ matching
function datasetRun() {
  return state.mode === "dataset" && state.scope === "samples" && state.dataset !== null;
}

function sampleCount() {
  const n = parseInt($("#samples-input").value, 10);
  return Number.isFinite(n) && n >= 1 ? Math.min(n, 500) : null;
}

/** The input of a run: free text's keys, one record, or (a dataset run) the dataset's first N records. */
function inputBody() {
  if (datasetRun()) { const n = sampleCount(); return n ? {dataset: state.dataset.name, samples: n} : null; }
  if (state.mode === "dataset") return state.dataset ? {dataset: state.dataset.name, index: state.dataset.index} : null;
  const sample = textSample();
  return sample.prompt ? {sample} : null;
}

/** What the methods are matched against: for a dataset run, the keys every record of the dataset has. */
function matchBody() {
  return datasetRun() ? {dataset: state.dataset.name} : inputBody();
}

let matchSeq = 0;
const requestMatch = debounce(async () => {
  const body = matchBody();
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
  const n = sampleCount();
  $("#run-btn").textContent = datasetRun() ? `Run on ${n || "?"} records` : "Run selected methods";
  $("#run-btn").disabled = state.selected.size === 0 || (datasetRun() && !n);
  if (datasetRun()) { $("#run-estimate").textContent = state.selected.size ? `${state.selected.size} selected, estimating…` : ""; estimateDataset(); return; }
  $("#run-estimate").textContent = state.selected.size ? `${state.selected.size} selected` + (any ? `, ≈ ${fmtSeconds(total)}` : "") : "";
}

function selectedMethods() {
  return state.matches.filter((m) => m.eligible && state.selected.has(m.name)).map((m) => m.name);
}

let estimateSeq = 0;
/** A dataset run's estimate from the server: every record's estimates of the chosen methods, added up. */
const estimateDataset = debounce(async () => {
  const body = inputBody();
  const methods = selectedMethods();
  const model = modelSpec();
  const seq = ++estimateSeq;
  if (!datasetRun() || !body || !methods.length || !model) return;
  try {
    const cost = await api("/api/estimate", {method: "POST", body: Object.assign({model, methods, params: collectParams(methods)}, body)});
    if (seq !== estimateSeq) return;
    $("#run-estimate").textContent = `${methods.length} selected, ${cost.samples} records, ≈ ${fmtSeconds(cost.seconds)} in all` +
      (cost.memory_bytes ? `, ${fmtBytes(cost.memory_bytes)} at most` : "") + (cost.refusal ? ` — over this server's cap: ${cost.refusal}` : "");
  } catch (err) {
    if (seq === estimateSeq) $("#run-estimate").textContent = err.message;
  }
}, 300);

function setScope(scope) {
  state.scope = scope;
  requestMatch();
}

async function startRun() {
  const body = inputBody();
  if (!body) { toast(state.mode === "text" ? "Type an input first." : "Choose a record first."); return; }
  const model = modelSpec();
  if (!model) { toast("Choose a model first."); return; }
  const methods = selectedMethods();
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

/** Wire the view's controls and load its lists (methods, models, datasets). */
export async function initDiagnose() {
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
  $("#scope-record").addEventListener("change", () => setScope("record"));
  $("#scope-samples").addEventListener("change", () => setScope("samples"));
  $("#samples-input").addEventListener("input", () => { if (datasetRun()) updateEstimate(); });
  renderKeys();
  updateEstimate();
  const [methods] = await Promise.all([api("/api/methods"), loadModels(), loadDatasets()]);
  state.methods = methods;
  for (const m of methods) state.methodInfo[m.name] = m;
}
