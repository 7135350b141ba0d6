/* knowmri web UI: native ES modules, no build step. Talks to the JSON API under /api (docs/SERVER.md).
 *
 * app.js        the entry: the router, the Runs list, start-up
 * diagnose.js   model, input, matching methods, starting a run
 * run.js        one run: live progress, cancel, its report
 * compare.js    two runs side by side
 * api.js, ui.js the API client; small shared helpers
 * report/render.js  the report renderer, shared with the saved index.html (knowmri/report/static) */

import {api, withToken} from "./api.js";
import {initDiagnose} from "./diagnose.js";
import {openCompare} from "./compare.js";
import {badge, fmtTime, h} from "./report/render.js";
import {cancelRun, openRun, openSample, stopFollowing} from "./run.js";
import {$, $$, health, shortText, toast} from "./ui.js";

let runsTimer = null;

// ------------------------------------------------------------------ router
function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  const view = parts[0] || "diagnose";
  stopFollowing();
  if (runsTimer) { clearTimeout(runsTimer); runsTimer = null; }
  for (const section of $$(".view")) section.hidden = true;
  for (const link of $$(".topbar nav a")) link.removeAttribute("aria-current");
  const nav = {diagnose: "diagnose", run: "runs", runs: "runs", compare: "compare"}[view] || "diagnose";
  $("#nav-" + nav).setAttribute("aria-current", "page");
  if (view === "run" && parts[1] && parts[2] === "sample" && parts[3] !== undefined) { $("#view-run").hidden = false; openSample(parts[1], parts[3]); }
  else if (view === "run" && parts[1]) { $("#view-run").hidden = false; openRun(parts[1]); }
  else if (view === "runs") { $("#view-runs").hidden = false; loadRuns(); }
  else if (view === "compare") { $("#view-compare").hidden = false; openCompare(parts[1], parts[2]); }
  else { $("#view-diagnose").hidden = false; }
}

// ------------------------------------------------------------------ runs list
async function loadRuns() {
  let data;
  try { data = await api("/api/runs?limit=200"); } catch (err) { toast(err.message); return; }
  const body = $("#runs-table tbody");
  const checked = new Set($$("#runs-table input[type=checkbox]:checked").map((c) => c.value));
  body.replaceChildren(...data.runs.map((r) => {
    const done = r.status === "done";
    const active = r.status === "running" || r.status === "queued";
    const box = h("input", {type: "checkbox", value: r.id, id: "pick-" + r.id, disabled: !done, checked: checked.has(r.id),
      "aria-label": "Select run " + r.id + " for comparison", onchange: updateCompareButton});
    const input = r.input || {};
    const what = input.samples ? `${input.dataset}, first ${input.samples} records` : input.dataset ? `${input.dataset} #${input.index}: ` : "";
    return h("tr", {dataset: {run: r.id}},
      h("td", {}, box), h("td", {}, badge(r.status), r.status === "running" && r.progress ? ` ${Math.round((r.progress.fraction || 0) * 100)}%` : "",
        r.status === "running" && r.progress && r.progress.samples ? ` (${r.progress.samples_done || 0}/${r.progress.samples})` : ""),
      h("td", {}, fmtTime(r.created)), h("td", {}, r.model), h("td", {class: "prompt"}, what + shortText((r.sample || {}).prompt, 70)),
      h("td", {}, (r.methods || ["all eligible"]).join(", ")),
      h("td", {class: "actions"},
        h("a", {href: "#/run/" + r.id, class: "button small"}, "Open"),
        done ? h("a", {href: withToken(`/api/runs/${r.id}/report.html?download=1`), class: "button small secondary"}, "HTML") : null,
        done ? h("a", {href: withToken(`/api/runs/${r.id}/report.json?download=1`), class: "button small secondary"}, "JSON") : null,
        active ? h("button", {type: "button", class: "small link", "aria-label": "Cancel run " + r.id,
          onclick: async () => { await cancelRun(r.id); loadRuns(); }}, "Cancel") : null,
        active ? null : h("button", {type: "button", class: "small link", "aria-label": "Delete run " + r.id,
          onclick: () => deleteRun(r.id)}, "Delete")));
  }));
  $("#runs-empty").hidden = data.runs.length > 0;
  updateCompareButton();
  if (runsTimer) clearTimeout(runsTimer);
  runsTimer = data.runs.some((r) => r.status === "running" || r.status === "queued")
    ? setTimeout(() => { if (!$("#view-runs").hidden) loadRuns(); }, 2000) : null;
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

// ------------------------------------------------------------------ start
async function init() {
  window.addEventListener("hashchange", route);
  try {
    await initDiagnose();
  } catch (err) {
    toast(err.status === 401 ? "This server needs a token: open the URL printed by `knowmri serve` (with ?token=…)." : err.message);
  }
  health();
  setInterval(health, 15000);
  route();
  document.body.dataset.ready = "true";
}

init();
