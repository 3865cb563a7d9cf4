// overparam dashboard: sweeps and runs with their states, live charts fed by the sweep's SSE
// stream, and the sweep analysis. Plain JavaScript over the REST API; charts by uPlot.
"use strict";

const API = "/api/v1";
const LOSS = document.body.dataset.lossMetric;
const LAMBDA_MIN = document.body.dataset.lambdaMetric;
const HISTORY_POINTS = 400; // per series for the first draw (min/max downsampled server-side)
const FINAL = new Set(["succeeded", "diverged", "failed", "cancelled"]);
const SEEDS = new Set(["seed", "data.seed"]);
const VIRIDIS = ["#440154", "#414487", "#2a788e", "#22a884", "#7ad151", "#bddf26"];

const state = {
  sweepId: null,
  runs: new Map(), // id -> run (status, overrides, config)
  series: { [LOSS]: new Map(), [LAMBDA_MIN]: new Map() }, // metric -> run id -> {x, y}
  latest: new Map(), // run id -> {step, loss, lambda}
  charts: {},
  source: null,
  colorBy: null,
  redrawPending: false,
  analysisTimer: null,
  updates: 0, // stream batches applied (the browser test watches it)
};
window.overparamDashboard = state;

async function api(path) {
  const response = await fetch(API + path, { headers: { accept: "application/json" } });
  if (!response.ok) throw new Error(`${response.status} ${path}`);
  return response.json();
}

function number(value) {
  return typeof value === "string" ? Number(value) : value; // "NaN", "Infinity", "-Infinity"
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "";
  if (typeof value !== "number") return String(value);
  return Math.abs(value) >= 1e4 || (Math.abs(value) < 1e-3 && value !== 0)
    ? value.toExponential(digits - 1)
    : Number(value.toPrecision(digits)).toString();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "style") node.setAttribute("style", value);
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

// -- sweeps --------------------------------------------------------------------------------------

async function loadSweeps() {
  const { data } = await api("/sweeps?limit=100");
  const list = document.getElementById("sweeps");
  list.replaceChildren(
    ...data.map((sweep) => {
      const counts = Object.entries(sweep.status_counts)
        .map(([status, n]) => `${n} ${status}`)
        .join(", ");
      const item = el(
        "li",
        { "data-sweep-id": sweep.id, class: sweep.id === state.sweepId ? "selected" : "" },
        el("div", { class: "name" }, `#${sweep.id} ${sweep.name}`),
        el("div", { class: "counts" }, `${sweep.run_count} runs: ${counts}`),
      );
      item.addEventListener("click", () => (location.hash = `sweep=${sweep.id}`));
      return item;
    }),
  );
  if (!data.length) list.replaceChildren(el("li", { class: "muted" }, "no sweeps yet"));
  if (state.sweepId === null && data.length && !location.hash) location.hash = `sweep=${data[0].id}`;
}

function params(run) {
  return Object.entries(run.overrides || {})
    .map(([key, value]) => `${key}=${JSON.stringify(value)}`)
    .join(" ");
}

function chooseColorBy(runs) {
  const keys = new Set(runs.flatMap((run) => Object.keys(run.overrides || {})));
  const varying = [...keys].filter(
    (key) => !SEEDS.has(key) && new Set(runs.map((run) => JSON.stringify(run.overrides[key]))).size > 1,
  );
  return varying.includes("width") ? "width" : varying[0] || null;
}

function colorOf(run) {
  const runs = [...state.runs.values()];
  const key = state.colorBy;
  const values = key
    ? [...new Set(runs.map((r) => JSON.stringify(r.overrides[key])))].sort((a, b) => number(JSON.parse(a)) - number(JSON.parse(b)))
    : runs.map((r) => String(r.id));
  const index = values.indexOf(key ? JSON.stringify(run.overrides[key]) : String(run.id));
  const t = values.length > 1 ? index / (values.length - 1) : 0.5;
  return VIRIDIS[Math.min(VIRIDIS.length - 1, Math.round(t * (VIRIDIS.length - 1)))];
}

async function selectSweep(id) {
  if (state.source) state.source.close();
  Object.values(state.charts).forEach((chart) => chart.destroy());
  Object.assign(state, { sweepId: id, source: null, charts: {}, updates: 0 });
  state.runs = new Map();
  state.latest = new Map();
  state.series = { [LOSS]: new Map(), [LAMBDA_MIN]: new Map() };
  document.getElementById("empty").hidden = true;
  document.getElementById("sweep").hidden = false;
  document.querySelectorAll("#sweeps li").forEach((li) => li.classList.toggle("selected", li.dataset.sweepId == id));
  const sweep = await api(`/sweeps/${id}`);
  document.getElementById("sweep-title").textContent = `Sweep #${sweep.id}: ${sweep.name}`;
  const { data: runs } = await api(`/runs?sweep_id=${id}&limit=1000`);
  runs.forEach((run) => state.runs.set(run.id, run));
  state.colorBy = chooseColorBy(runs);
  await loadHistory(id);
  renderRuns();
  redraw();
  loadAnalysis();
  if (runs.some((run) => !FINAL.has(run.status))) openStream(id);
  else setLive(false, "finished");
}

// -- metrics -------------------------------------------------------------------------------------

function addPoint(metric, runId, step, value) {
  const runs = state.series[metric];
  if (!runs) return;
  if (!runs.has(runId)) runs.set(runId, { x: [], y: [] });
  const s = runs.get(runId);
  if (s.x.length && step <= s.x[s.x.length - 1]) return; // already drawn (history or stream)
  const v = number(value);
  s.x.push(step);
  s.y.push(Number.isFinite(v) && (metric !== LOSS || v > 0) ? v : null);
  const latest = state.latest.get(runId) || { step: 0, loss: null, lambda: null };
  if (metric === LOSS) Object.assign(latest, { step: Math.max(latest.step, step), loss: v });
  else latest.lambda = v;
  state.latest.set(runId, latest);
}

async function loadHistory(id) {
  let cursor = null;
  do {
    const query = new URLSearchParams({ max_points: HISTORY_POINTS, limit: 100000 });
    query.append("name", LOSS);
    query.append("name", LAMBDA_MIN);
    if (cursor) query.set("cursor", cursor);
    let page;
    try {
      page = await api(`/sweeps/${id}/metrics?${query}`);
    } catch (error) {
      return; // no run has points yet (404): the stream brings them
    }
    for (const p of page.data) addPoint(p.metric, p.run_id, p.step, p.value);
    cursor = page.next_cursor;
  } while (cursor);
}

function setLive(live, text) {
  const badge = document.getElementById("live");
  badge.textContent = text;
  badge.classList.toggle("live", live);
}

function openStream(id) {
  const query = new URLSearchParams();
  query.append("name", LOSS);
  query.append("name", LAMBDA_MIN);
  const source = new EventSource(`${API}/sweeps/${id}/stream?${query}`);
  state.source = source;
  setLive(true, "live");
  source.addEventListener("metrics", (event) => {
    const data = JSON.parse(event.data);
    for (const p of data.points) addPoint(p.metric, data.run_id, p.step, p.value);
    state.updates += 1;
    scheduleRedraw();
  });
  source.addEventListener("status", (event) => {
    const data = JSON.parse(event.data);
    const run = state.runs.get(data.run_id);
    if (!run) return;
    const finished = !FINAL.has(run.status) && FINAL.has(data.status);
    Object.assign(run, { status: data.status, error: data.error, summary: data.summary });
    renderRuns();
    if (finished) scheduleAnalysis();
  });
  source.addEventListener("end", () => {
    source.close();
    setLive(false, "finished");
    renderRuns();
    scheduleAnalysis();
    loadSweeps();
  });
  source.onerror = () => setLive(false, "reconnecting…"); // EventSource resumes by itself
}

// -- charts --------------------------------------------------------------------------------------

function chartData(metric) {
  const ids = [...state.runs.keys()].filter((id) => state.series[metric].has(id));
  const tables = ids.map((id) => [state.series[metric].get(id).x, state.series[metric].get(id).y]);
  return { ids, data: tables.length ? uPlot.join(tables) : [[]] };
}

function drawChart(key, metric, logScale) {
  const container = document.getElementById(key);
  const { ids, data } = chartData(metric);
  container.dataset.points = ids.reduce((n, id) => n + state.series[metric].get(id).x.length, 0);
  const signature = ids.join(",");
  let chart = state.charts[key];
  if (chart && chart.signature === signature) {
    chart.setData(data);
    return;
  }
  if (chart) chart.destroy();
  if (!ids.length) return;
  const width = Math.max(360, Math.min(620, container.parentElement.clientWidth - 20 || 560));
  chart = new uPlot(
    {
      width,
      height: 300,
      scales: { x: { time: false }, y: logScale ? { distr: 3, log: 10 } : {} },
      axes: [
        { label: "step k" },
        logScale
          ? { size: 64, values: (u, splits) => splits.map((v) => (v === null ? "" : fmt(v, 2))) }
          : { size: 64 },
      ],
      legend: { show: false }, // the runs table below carries each run's colour
      series: [
        { label: "step" },
        ...ids.map((id) => {
          const run = state.runs.get(id);
          return { label: `run ${id} ${params(run)}`, stroke: colorOf(run), width: 1.5, spanGaps: true };
        }),
      ],
    },
    data,
    container,
  );
  chart.signature = signature;
  state.charts[key] = chart;
}

function redraw() {
  state.redrawPending = false;
  drawChart("chart-loss", LOSS, true);
  drawChart("chart-lambda", LAMBDA_MIN, false);
  renderRuns();
}

function scheduleRedraw() {
  if (state.redrawPending) return;
  state.redrawPending = true;
  setTimeout(redraw, 250); // batches arrive in bursts: draw at most four times a second
}

function renderRuns() {
  const body = document.querySelector("#runs tbody");
  body.replaceChildren(
    ...[...state.runs.values()].map((run) => {
      const latest = state.latest.get(run.id) || {};
      return el(
        "tr",
        { "data-run-id": run.id, "data-status": run.status, "data-step": latest.step ?? "" },
        el("td", {}, el("span", { class: "swatch", style: `background:${colorOf(run)}` }), run.id),
        el("td", {}, params(run)),
        el("td", { class: `status-${run.status}`, title: run.error || "" }, run.status),
        el("td", { class: "num" }, latest.step ?? ""),
        el("td", { class: "num" }, fmt(latest.loss)),
        el("td", { class: "num" }, fmt(latest.lambda)),
      );
    }),
  );
}

// -- analysis ------------------------------------------------------------------------------------

function scheduleAnalysis() {
  clearTimeout(state.analysisTimer);
  state.analysisTimer = setTimeout(loadAnalysis, 500);
}

function meanStd(stats) {
  if (!stats || stats.mean === null) return "";
  return stats.std === null ? fmt(stats.mean) : `${fmt(stats.mean)} ± ${fmt(stats.std, 2)}`;
}

function groupText(group) {
  return Object.entries(group).map(([k, v]) => `${k}=${v}`).join(" ") || "all runs";
}

async function loadAnalysis() {
  const id = state.sweepId;
  const note = document.getElementById("analysis-note");
  let analysis;
  try {
    analysis = await api(`/sweeps/${id}/analysis`);
  } catch (error) {
    note.textContent = `analysis unavailable: ${error.message}`;
    return;
  }
  if (id !== state.sweepId) return;
  const widths = (analysis.smallest_width || [])
    .map((entry) => `${groupText(entry.group)}: smallest width where every run reached the loss threshold = ${entry.smallest_width_all ?? "none"}`)
    .join("; ");
  note.textContent = `swept: ${analysis.swept.join(", ") || "nothing"}. ${widths}`;
  document.getElementById("fits").hidden = !analysis.fits.length;
  document.querySelector("#fits tbody").replaceChildren(
    ...analysis.fits.map((fit) =>
      el(
        "tr",
        { "data-y": fit.y },
        el("td", {}, fit.x),
        el("td", {}, fit.y),
        el("td", {}, groupText(fit.group)),
        el("td", {}, fit.kind),
        el("td", { class: "num slope" }, fit.slope.toFixed(3)),
        el("td", { class: "num" }, fit.ci ? `[${fit.ci[0].toFixed(3)}, ${fit.ci[1].toFixed(3)}]` : ""),
        el("td", { class: "num" }, fit.n_points),
        el("td", { class: "num" }, fit.r2.toFixed(3)),
        el("td", { class: "num" }, fit.reference_slope ?? ""),
      ),
    ),
  );
  document.querySelector("#groups tbody").replaceChildren(
    ...analysis.groups.map((group) =>
      el(
        "tr",
        {},
        el("td", {}, groupText(group.params)),
        el("td", { class: "num" }, group.run_ids.length),
        ...["final_loss", "fitted_rate", "theory_rate", "steps_to_threshold", "lambda_min_min_ratio"].map((key) =>
          el("td", { class: "num" }, meanStd(group.stats[key])),
        ),
      ),
    ),
  );
  const stamp = Date.now();
  document.getElementById("plot-loss").src = `${API}/sweeps/${id}/plots/loss?t=${stamp}`;
  if (analysis.fits.length) document.getElementById("plot-scaling").src = `${API}/sweeps/${id}/plots/scaling?t=${stamp}`;
  else document.getElementById("plot-scaling").removeAttribute("src");
}

// -- start ---------------------------------------------------------------------------------------

function route() {
  const match = /sweep=(\d+)/.exec(location.hash);
  if (match && Number(match[1]) !== state.sweepId) selectSweep(Number(match[1]));
}

window.addEventListener("hashchange", route);
loadSweeps().then(route);
setInterval(loadSweeps, 5000);
