/* Small helpers of the web UI's views: selectors, the toast, text formats, the server status line. */

import {api} from "./api.js";
import {fmtTime} from "./report/render.js";

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

let toastTimer = null;
export function toast(message) {
  const el = $("#toast");
  el.textContent = message;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, 6000);
}

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

export function fmtBytes(b) {
  if (!b) return "";
  if (b < 1 << 20) return Math.ceil(b / 1024) + " KB";
  if (b < 1 << 30) return (b / (1 << 20)).toFixed(1) + " MB";
  return (b / (1 << 30)).toFixed(2) + " GB";
}

export function shortText(s, n = 80) {
  s = String(s || "");
  return s.length > n ? s.slice(0, n - 1) + "…" : s;
}

/** A run in a list of choices: when, which model, which prompt. */
export function runLabel(r) {
  const input = r.input || {};
  const what = input.samples ? `${input.dataset}, ${input.samples} records` : shortText((r.sample || {}).prompt, 40);
  return `${fmtTime(r.created)} · ${r.model} · ${what}`;
}

/** The status line in the top bar: version, runs stored, what the worker is doing. */
export async function health() {
  try {
    const data = await api("/api/health");
    const w = data.worker;
    $("#server-status").textContent = `v${data.version} · ${data.runs} run${data.runs === 1 ? "" : "s"}` + (w.current ? " · running a job" : "") + (w.queued ? ` · ${w.queued} queued` : "");
  } catch (err) {
    $("#server-status").textContent = err.status === 401 ? "token needed" : "server unreachable";
  }
}

let plotlyLoading = null;
/** Plotly's bundle (served by the package, no CDN), loaded on first use so the input view opens fast. */
export function loadPlotly() {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  if (!plotlyLoading) {
    plotlyLoading = new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = "/static/plotly.min.js";
      script.onload = () => resolve(window.Plotly);
      script.onerror = () => { plotlyLoading = null; reject(new Error("Plotly failed to load")); };
      document.head.append(script);
    });
  }
  return plotlyLoading;
}
