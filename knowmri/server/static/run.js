/* The Run view: one run's live progress (server-sent events, polling as a fallback; a dataset run's records
 * done and time left), a Cancel button while it is queued or running, then its report; and one record's own
 * report from a dataset run (#/run/<id>/sample/<index>). */

import {api, withToken} from "./api.js";
import {badge, fmtSeconds, h, renderReport} from "./report/render.js";
import {$, health, loadPlotly, runLabel, toast} from "./ui.js";

const ACTIVE = new Set(["queued", "running"]);
let current = null;   // the id of the run on screen
let stream = null;
let pollTimer = null;

/** Stop following the run on screen (its event stream or its polling). */
export function stopFollowing() {
  if (stream) { stream.close(); stream = null; }
  if (pollTimer) { clearTimeout(pollTimer); pollTimer = null; }
}

function resetRunView(id, title) {
  current = id;
  $("#run-title").textContent = title;
  $("#run-report").replaceChildren();
  $("#run-error").hidden = true;
  $("#run-note").hidden = true;
  $("#progress-card").hidden = true;
  $("#cancel-run").hidden = true;
  $("#cancel-run").onclick = () => cancelShown(id);
  $("#export-html").href = withToken(`/api/runs/${id}/report.html?download=1`);
  $("#export-json").href = withToken(`/api/runs/${id}/report.json?download=1`);
}

export async function openRun(id) {
  resetRunView(id, "Run " + id);
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
  if (ACTIVE.has(run.status)) follow(id);
}

/** One record's own report from a dataset run, with a link back to the run's aggregate. */
export async function openSample(id, index) {
  resetRunView(id, `Run ${id}, record ${index}`);
  let data;
  try {
    data = await api(`/api/runs/${id}/samples/${encodeURIComponent(index)}`);
  } catch (err) {
    $("#run-status").replaceChildren();
    showRunError(err.message);
    return;
  }
  $("#run-status").replaceChildren(h("a", {href: "#/run/" + id, class: "button small secondary"}, "‹ All records"));
  for (const el of [$("#export-html"), $("#export-json")]) el.classList.add("disabled");
  if (data.error) showRunError(`This record does not suit the model: ${data.error}`);
  renderReport($("#run-report"), data, {plotly: loadPlotly});
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
  $("#cancel-run").hidden = !ACTIVE.has(run.status);
  if (run.status === "error") { $("#progress-card").hidden = true; showRunError(run.error || "unknown error"); }
  if (run.status === "cancelled") {
    $("#progress-card").hidden = true;
    $("#run-note").hidden = false;
    $("#run-note").replaceChildren(h("h2", {}, "The run was cancelled"),
      h("p", {class: "hint"}, "Start it again from Diagnose to get its report."));
  }
  if (ACTIVE.has(run.status)) showProgress(run);
  if (!ACTIVE.has(run.status)) health();
  if (run.report && (done || run.status === "cancelled")) {
    $("#progress-card").hidden = true;
    renderReport($("#run-report"), run.report, {run, plotly: loadPlotly,
      sampleHref: (s) => (s.file ? `#/run/${run.id}/sample/${s.index}` : null)});
  }
}

function showProgress(run) {
  const p = run.progress || {};
  $("#progress-card").hidden = false;
  $("#run-status").replaceChildren(badge(run.status));
  $("#run-progress").value = p.fraction || 0;
  $("#progress-message").textContent = run.status === "queued" ? "Queued: waiting for the model worker…"
    : p.samples ? `${p.samples_done || 0} of ${p.samples} records done`
    : [p.method, p.message].filter(Boolean).join(": ") || p.stage || "";
  const eta = [];
  if (p.eta_seconds !== undefined && p.eta_seconds !== null && run.status === "running") eta.push(`about ${fmtSeconds(p.eta_seconds)} left`);
  if (p.estimate_seconds !== undefined && p.estimate_seconds !== null) eta.push(`estimated ${fmtSeconds(p.estimate_seconds)} in all`);
  $("#progress-eta").textContent = eta.join(" · ");
  const list = $("#progress-methods");
  list.replaceChildren(...Object.entries(p.methods || {}).map(([name, status]) =>
    h("li", {class: "status-" + status}, badge(status), " ", name)));
}

function follow(id) {
  stopFollowing();
  const onEnd = async () => {
    stopFollowing();
    if (current !== id) return;
    try { showRun(await api(`/api/runs/${id}`)); } catch (err) { showRunError(err.message); }
  };
  if (window.EventSource) {
    const source = new EventSource(withToken(`/api/runs/${id}/events`));
    stream = source;
    source.addEventListener("progress", (e) => {
      const data = JSON.parse(e.data);
      if (ACTIVE.has(data.status)) showProgress(data);
    });
    source.addEventListener("done", onEnd);
    source.addEventListener("cancelled", onEnd);
    source.addEventListener("error", (e) => {
      if (e.data) { onEnd(); return; }           // the run's own error event
      if (source.readyState === EventSource.CLOSED) { stream = null; poll(id); }
    });
  } else {
    poll(id);
  }
}

function poll(id) {
  pollTimer = setTimeout(async () => {
    try {
      const run = await api(`/api/runs/${id}?report=false`);
      if (ACTIVE.has(run.status)) { showProgress(run); poll(id); }
      else showRun(await api(`/api/runs/${id}`));
    } catch (err) { showRunError(err.message); }
  }, 1000);
}

/** Ask the server to cancel a queued or running run: the run's record, or null (the reason is toasted). */
export async function cancelRun(id) {
  try {
    return await api(`/api/runs/${id}/cancel`, {method: "POST"});
  } catch (err) {
    toast(err.message);
    return null;
  }
}

async function cancelShown(id) {
  const button = $("#cancel-run");
  button.disabled = true;
  const run = await cancelRun(id);
  button.disabled = false;
  if (!run || current !== id || $("#view-run").hidden) return;
  if (!ACTIVE.has(run.status)) stopFollowing();   // else the stream or polling reports the end
  showRun(run);
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
