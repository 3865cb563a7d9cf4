// overparam dashboard: the sweeps and external runs, a sweep's page (live loss with the
// theory's curve, λ_min(H(k)), any metric, runs, analysis) fed by the sweep's SSE stream, and
// the routing between it and a run's page (run.js). Plain JavaScript over the REST API.
"use strict";

const LOSS = METRICS.loss;
const LAMBDA_MIN = METRICS.lambdaMin;
const THEORY = METRICS.predictedLoss;
const STREAMED = [LOSS, LAMBDA_MIN, THEORY];
const HISTORY_POINTS = 400; // per series for the first draw (min/max downsampled server-side)
const SEEDS = new Set(["seed", "data.seed"]);
const GROUP_QUANTITIES = ["final_loss", "fitted_rate", "theory_rate", "steps_to_threshold", "lambda_min_min_ratio", "eta_lambda_max_max"];

const state = {
  sweepId: null,
  runs: new Map(), // id -> run (status, overrides, config)
  series: Object.fromEntries(STREAMED.map((m) => [m, new Map()])), // metric -> run id -> {x, y}
  latest: new Map(), // run id -> {step, loss, lambda}
  flags: new Map(), // run id -> the analysis' flags
  colorBy: null,
  styleBy: null,
  source: null,
  redrawPending: false,
  analysisTimer: null,
  updates: 0, // stream batches applied (the browser test watches it)
};
window.overparamDashboard = state;

const figures = {
  loss: new Figure(document.getElementById("fig-loss"), { caption: `training loss ${labelOf(LOSS)}, ${labelOf(THEORY)} dashed` }),
  lambda: new Figure(document.getElementById("fig-lambda"), { caption: `${labelOf(LAMBDA_MIN)} of the empirical NTK` }),
  chooser: new Figure(document.getElementById("fig-chooser")),
};
figures.loss.draw = () => drawLoss();
figures.lambda.draw = () => drawLambda();
figures.chooser.draw = () => loadChosen();
const chooser = document.querySelector("#fig-chooser .metric-choice");
chooser.addEventListener("change", () => loadChosen());
document.querySelectorAll("th.q").forEach((th) => (th.textContent = labelOf(th.dataset.q)));

function params(run) {
  return Object.entries(run.overrides || {})
    .map(([key, value]) => `${key}=${JSON.stringify(value)}`)
    .join(" ");
}

function showView(id) {
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== id;
}

// -- the lists -----------------------------------------------------------------------------------

function card(href, selected, title, detail) {
  const item = el("li", { class: selected ? "selected" : "" }, el("a", { href }, el("div", { class: "name" }, title), el("div", { class: "counts" }, detail)));
  return item;
}

// Owners seen in the lists; the filter shows one owner's sweeps and runs.
function ownerFilter(items) {
  const select = document.getElementById("owner-filter");
  const known = new Set([...select.options].map((o) => o.value));
  for (const owner of new Set(items.map((i) => i.owner).filter(Boolean))) {
    if (!known.has(owner)) select.append(el("option", { value: owner }, owner));
  }
  select.onchange = () => Promise.all([loadSweeps(), loadExternal()]);
  return select.value ? items.filter((i) => i.owner === select.value) : items;
}

function byOwner(item) {
  return item.owner ? ` · ${item.owner}` : "";
}

async function loadSweeps() {
  const { data: all } = await api("/sweeps?limit=100");
  const data = ownerFilter(all);
  const list = document.getElementById("sweeps");
  list.replaceChildren(
    ...data.map((sweep) => {
      const counts = Object.entries(sweep.status_counts).map(([status, n]) => `${n} ${status}`).join(", ");
      const item = card(`#sweep=${sweep.id}`, sweep.id === state.sweepId, `#${sweep.id} ${sweep.name}${sweep.kind === "experiment" ? " (experiment)" : ""}${byOwner(sweep)}`, `${sweep.run_count} runs: ${counts}`);
      item.dataset.sweepId = sweep.id;
      return item;
    }),
  );
  if (!data.length) list.replaceChildren(el("li", { class: "muted" }, "no sweeps yet"));
  if (!location.hash && data.length) location.hash = `sweep=${data[0].id}`;
}

async function loadExternal() {
  const { data: all } = await api("/runs?external=true&limit=1000");
  const data = ownerFilter(all);
  const list = document.getElementById("external");
  const newest = data.slice(-50).reverse();
  list.replaceChildren(
    ...newest.map((run) => {
      const item = card(`#run=${run.id}`, run.id === currentRunId(), `run #${run.id}${run.name ? ` ${run.name}` : ""}${byOwner(run)}`, `${run.status}, ${run.summary.steps_done ?? 0} steps`);
      item.dataset.runId = run.id;
      return item;
    }),
  );
  if (!data.length) list.replaceChildren(el("li", { class: "muted" }, "none yet (POST /api/v1/runs with external: true)"));
}

// -- a sweep -------------------------------------------------------------------------------------

function varying(runs) {
  const keys = new Set(runs.flatMap((run) => Object.keys(run.overrides || {})));
  const out = [...keys].filter((key) => !SEEDS.has(key) && new Set(runs.map((run) => JSON.stringify(run.overrides[key]))).size > 1);
  return out.sort((a, b) => (a === "width" ? -1 : b === "width" ? 1 : 0));
}

function looks() {
  const runs = [...state.runs.values()];
  const colors = palette(runs.map((run) => (state.colorBy ? run.overrides[state.colorBy] : run.id)));
  const styles = dashes(runs.map((run) => (state.styleBy ? run.overrides[state.styleBy] : null)));
  return {
    color: (run) => colors.colorOf(state.colorBy ? run.overrides[state.colorBy] : run.id),
    dash: (run) => styles.dashOf(state.styleBy ? run.overrides[state.styleBy] : null),
    legend: (theory) => {
      const entries = state.colorBy
        ? colors.values.map((v) => ({ label: `${state.colorBy} = ${v}`, stroke: colors.colorOf(v) }))
        : runs.map((run) => ({ label: `run ${run.id}`, stroke: colors.colorOf(run.id) }));
      if (state.styleBy) entries.push(...styles.values.map((v) => ({ label: `${state.styleBy} = ${v}`, stroke: "#555", dash: styles.dashOf(v) })));
      if (theory) entries.push({ label: labelOf(THEORY), stroke: "#555", dash: THEORY_DASH });
      return entries;
    },
  };
}

function closeSweep() {
  if (state.source) state.source.close();
  Object.values(figures).forEach((figure) => figure.reset());
  Object.assign(state, { sweepId: null, source: null, updates: 0 });
}

async function showSweep(id) {
  closeRun();
  closeSweep();
  state.sweepId = id;
  state.runs = new Map();
  state.latest = new Map();
  state.flags = new Map();
  state.series = Object.fromEntries(STREAMED.map((m) => [m, new Map()]));
  showView("sweep");
  document.querySelectorAll("#sweeps li").forEach((li) => li.classList.toggle("selected", li.dataset.sweepId === String(id)));
  const sweep = await api(`/sweeps/${id}`);
  document.getElementById("sweep-title").textContent = `${sweep.kind === "experiment" ? "Experiment" : "Sweep"} #${sweep.id}: ${sweep.name}`;
  const { data: runs } = await api(`/runs?sweep_id=${id}&limit=1000`);
  runs.forEach((run) => state.runs.set(run.id, run));
  [state.colorBy, state.styleBy] = varying(runs);
  await loadHistory(id);
  redraw();
  loadAnalysis();
  loadChooserNames(runs);
  if (runs.some((run) => !FINAL.has(run.status))) openStream(id);
  else setLive(false, "finished");
}

function addPoint(metric, runId, step, value) {
  const runs = state.series[metric];
  if (!runs) return;
  if (!runs.has(runId)) runs.set(runId, { x: [], y: [] });
  const s = runs.get(runId);
  if (s.x.length && step <= s.x[s.x.length - 1]) return; // already drawn (history or stream)
  s.x.push(step);
  s.y.push(number(value));
  const latest = state.latest.get(runId) || { step: 0, loss: null, lambda: null };
  if (metric === LOSS) Object.assign(latest, { step: Math.max(latest.step, step), loss: number(value) });
  else if (metric === LAMBDA_MIN) latest.lambda = number(value);
  state.latest.set(runId, latest);
}

async function loadHistory(id) {
  let series;
  try {
    series = await readPages(`/sweeps/${id}/metrics`, metricQuery(STREAMED, HISTORY_POINTS));
  } catch (error) {
    return; // no run has points yet (404): the stream brings them
  }
  for (const s of series) s.x.forEach((step, i) => addPoint(s.metric, s.runId, step, s.y[i]));
}

function setLive(live, text) {
  const badge = document.getElementById("live");
  badge.textContent = text;
  badge.classList.toggle("live", live);
}

function openStream(id) {
  const query = new URLSearchParams();
  STREAMED.forEach((name) => query.append("name", name));
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

function drawLoss() {
  const look = looks();
  const tables = [];
  const series = [];
  for (const [id, run] of state.runs) {
    const loss = state.series[LOSS].get(id);
    const theory = state.series[THEORY].get(id);
    if (loss) {
      tables.push(loss);
      series.push({ label: `run ${id} ${params(run)}`, stroke: look.color(run), dash: look.dash(run) });
    }
    if (theory) {
      tables.push(theory);
      series.push({ label: `run ${id} theory`, stroke: look.color(run), dash: THEORY_DASH, width: 1, alpha: 0.8 });
    }
  }
  figures.loss.render(tables, series, look.legend(state.series[THEORY].size > 0));
}

function drawLambda() {
  const look = looks();
  const ids = [...state.runs.keys()].filter((id) => state.series[LAMBDA_MIN].has(id));
  const series = ids.map((id) => ({ label: `run ${id}`, stroke: look.color(state.runs.get(id)), dash: look.dash(state.runs.get(id)) }));
  figures.lambda.render(ids.map((id) => state.series[LAMBDA_MIN].get(id)), series, look.legend(false));
}

function redraw() {
  state.redrawPending = false;
  drawLoss();
  drawLambda();
  renderRuns();
}

function scheduleRedraw() {
  if (state.redrawPending) return;
  state.redrawPending = true;
  setTimeout(redraw, 250); // batches arrive in bursts: draw at most four times a second
}

function renderRuns() {
  const look = looks();
  const body = document.querySelector("#runs tbody");
  body.replaceChildren(
    ...[...state.runs.values()].map((run) => {
      const latest = state.latest.get(run.id) || {};
      const flags = state.flags.get(run.id) || [];
      return el(
        "tr",
        { "data-run-id": run.id, "data-status": run.status, "data-step": latest.step ?? "" },
        el("td", {}, el("span", { class: "swatch", style: `background:${look.color(run)}` }), el("a", { href: `#run=${run.id}` }, run.id)),
        el("td", {}, params(run)),
        el("td", { class: `status-${run.status}`, title: run.error || "" }, run.status),
        el("td", { class: "num" }, latest.step ?? ""),
        el("td", { class: "num" }, fmt(latest.loss)),
        el("td", { class: "num" }, fmt(latest.lambda)),
        el("td", { class: "flag-names" }, flags.map((f) => f.name).join(", ")),
      );
    }),
  );
}

// -- the metric chooser --------------------------------------------------------------------------

async function loadChooserNames(runs) {
  const started = runs.filter((run) => run.status !== "queued");
  const lists = await Promise.all(started.map((run) => api(`/runs/${run.id}/metric-names`).then((r) => r.data, () => [])));
  const names = [...new Set(lists.flat())].sort();
  fillChooser(chooser, names, "ntk_rel_change");
  if (names.length) loadChosen();
}

async function loadChosen() {
  const id = state.sweepId;
  const metric = chooser.value;
  if (!metric || id === null) return;
  const figure = figures.chooser;
  const series = await readPages(`/sweeps/${id}/metrics`, metricQuery([metric], HISTORY_POINTS)).catch(() => []);
  if (id !== state.sweepId || metric !== chooser.value) return;
  const look = looks();
  const shown = series.filter((s) => state.runs.has(s.runId));
  figure.render(
    shown,
    shown.map((s) => ({ label: `run ${s.runId}`, stroke: look.color(state.runs.get(s.runId)), dash: look.dash(state.runs.get(s.runId)) })),
    look.legend(false),
  );
}

// -- analysis ------------------------------------------------------------------------------------

function scheduleAnalysis() {
  clearTimeout(state.analysisTimer);
  state.analysisTimer = setTimeout(loadAnalysis, 500);
}

function statsText(stats) {
  if (!stats || stats.mean === null || stats.mean === undefined) return "";
  if (stats.spans_decades && stats.geomean !== null) return stats.geostd ? `${fmt(stats.geomean)} ×/÷ ${fmt(stats.geostd)}` : fmt(stats.geomean);
  return stats.std === null ? fmt(stats.mean) : `${fmt(stats.mean)} ± ${fmt(stats.std)}`;
}

function groupText(group) {
  return Object.entries(group).map(([k, v]) => `${k}=${v}`).join(" ") || "all runs";
}

function renderGroups(groups) {
  const table = document.getElementById("groups");
  table.querySelector("thead").replaceChildren(
    el("tr", {}, el("th", {}, "group"), el("th", {}, "final runs"), ...GROUP_QUANTITIES.map((q) => el("th", { "data-q": q }, labelOf(q))), el("th", {}, "flags")),
  );
  table.querySelector("tbody").replaceChildren(
    ...groups.map((group) => {
      const total = group.run_ids.length;
      const final = total - (group.pending || 0);
      const flags = Object.entries(group.flags || {}).map(([name, n]) => `${name} ${n}/${final}`).join(", ");
      return el(
        "tr",
        { class: group.pending ? "partial" : "", "data-pending": group.pending || 0 },
        el("td", {}, groupText(group.params)),
        el("td", { class: "num" }, final === total ? total : `${final}/${total}`),
        ...GROUP_QUANTITIES.map((q) => el("td", { class: "num" }, statsText(group.stats[q]))),
        el("td", { class: "flag-names" }, flags),
      );
    }),
  );
}

function renderFits(fits) {
  document.getElementById("fits").hidden = !fits.length;
  document.querySelector("#fits tbody").replaceChildren(
    ...fits.map((fit) =>
      el(
        "tr",
        { "data-y": fit.y, "data-kind": fit.kind },
        el("td", {}, fit.x),
        el("td", { title: labelOf(fit.y) }, fit.y),
        el("td", {}, groupText(fit.group)),
        el("td", {}, fit.kind),
        el("td", { class: "num slope" }, fmt(fit.slope)),
        el("td", { class: "num" }, fit.ci ? `[${fmt(fit.ci[0])}, ${fmt(fit.ci[1])}]` : ""),
        el("td", { class: "num" }, fit.n_points),
        el("td", { class: "num" }, fmt(fit.r2)),
        el("td", { class: "num" }, fit.reference_slope ?? ""),
      ),
    ),
  );
}

function renderFlags(list, runs) {
  list.replaceChildren(
    ...runs
      .filter((run) => run.flags && run.flags.length)
      .map((run) => el("li", {}, el("a", { href: `#run=${run.id}` }, `run ${run.id}`), ` (${params(run)}): `, run.flags.map((f) => f.message).join("; "))),
  );
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
  const pending = analysis.groups.reduce((n, g) => n + (g.pending || 0), 0);
  const widths = (analysis.smallest_width || [])
    .map((entry) => `${groupText(entry.group)}: smallest width where every run reached the loss threshold = ${entry.smallest_width_all ?? "none"}`)
    .join("; ");
  const partial = pending ? ` ${pending} runs are not final yet: their groups show the final runs only.` : "";
  note.textContent = `swept: ${analysis.swept.join(", ") || "nothing"}.${partial} ${widths}`;
  analysis.runs.forEach((run) => state.flags.set(run.id, run.flags || []));
  renderGroups(analysis.groups);
  renderFits(analysis.fits);
  renderFlags(document.getElementById("sweep-flags"), analysis.runs);
  renderRuns();
  const stamp = Date.now();
  document.getElementById("plot-loss").src = `${API}/sweeps/${id}/plots/loss?t=${stamp}`;
  if (analysis.fits.length) document.getElementById("plot-scaling").src = `${API}/sweeps/${id}/plots/scaling?t=${stamp}`;
  else document.getElementById("plot-scaling").removeAttribute("src");
}

// -- start ---------------------------------------------------------------------------------------

function currentRunId() {
  const match = /run=(\d+)/.exec(location.hash);
  return match ? Number(match[1]) : null;
}

function route() {
  const sweep = /sweep=(\d+)/.exec(location.hash);
  const run = currentRunId();
  document.querySelectorAll("#external li").forEach((li) => li.classList.toggle("selected", li.dataset.runId === String(run)));
  if (run !== null) showRun(run);
  else if (sweep && Number(sweep[1]) !== state.sweepId) showSweep(Number(sweep[1]));
  else if (!sweep) showView("empty");
}

window.addEventListener("hashchange", route);
Promise.all([loadSweeps(), loadExternal()]).then(route);
setInterval(() => {
  loadSweeps();
  loadExternal();
}, 5000);
