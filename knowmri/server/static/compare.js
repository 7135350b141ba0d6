/* The Compare view: two finished runs side by side, with a short summary of how they differ. */

import {api} from "./api.js";
import {dataTable, h, renderReport} from "./report/render.js";
import {$, loadPlotly, runLabel, toast} from "./ui.js";

export async function openCompare(a, b) {
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
      if (run.report) renderReport(pane, run.report, {run, plotly: loadPlotly});
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
