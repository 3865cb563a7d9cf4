// overparam dashboard, a run's page (#run=ID): its loss with the theory's curve, λ_min(H(k)),
// per-layer movement and any metric, its analysis with its flags, every metric's range, its
// config and manifest, and a cancel button while it is queued or running. Follows the run's
// SSE stream while it trains.
"use strict";

const RUN_POINTS = 1000; // per series (min/max downsampled server-side)
const ANALYSIS_SECTIONS = {
  convergence: ["fitted_rate", "theory_rate", "rate_ratio", "late_lambda_min", "late_theory_rate", "du_rate_bound", "within_du_bound"],
  threshold: ["loss_threshold", "source", "steps_to_threshold", "reached"],
  spectrum: ["lambda_min_initial", "lambda_min_min", "lambda_min_min_ratio", "lambda0", "eta", "eta_lambda0", "eta_lambda_max_initial", "eta_lambda_max_max", "edge_of_stability_step", "stays_above_half_lambda0"],
  theory: ["y_Hinv_y", "predicted_distance", "measured_distance", "distance_ratio", "predicted_final_loss", "final_loss_ratio"],
};

const runView = {
  id: null,
  run: null,
  series: new Map(), // metric -> {x, y}
  source: null,
  figures: {
    loss: new Figure(document.getElementById("fig-run-loss"), { caption: `training loss ${labelOf(LOSS)}, ${labelOf(THEORY)} dashed` }),
    lambda: new Figure(document.getElementById("fig-run-lambda"), { caption: `${labelOf(LAMBDA_MIN)} and ${labelOf(METRICS.lambdaMax)}` }),
    movement: new Figure(document.getElementById("fig-run-movement"), { caption: `${labelOf(METRICS.movement)} per layer` }),
    chooser: new Figure(document.getElementById("fig-run-chooser")),
  },
};
window.overparamRun = runView;
const runChooser = document.querySelector("#fig-run-chooser .metric-choice");
runChooser.addEventListener("change", () => drawRunChosen());
runView.figures.loss.draw = () => drawRunLoss();
runView.figures.lambda.draw = () => drawRunLambda();
runView.figures.movement.draw = () => drawRunMovement();
runView.figures.chooser.draw = () => drawRunChosen();
document.getElementById("cancel").addEventListener("click", () => cancelRun());

function closeRun() {
  if (runView.source) runView.source.close();
  Object.values(runView.figures).forEach((figure) => figure.reset());
  Object.assign(runView, { id: null, run: null, source: null, series: new Map() });
}

async function showRun(id) {
  closeSweep();
  closeRun();
  runView.id = id;
  showView("run");
  const run = await api(`/runs/${id}`);
  if (id !== runView.id) return;
  runView.run = run;
  renderRunHead(run);
  document.getElementById("run-config").textContent = JSON.stringify(run.config, null, 2);
  document.getElementById("run-manifest").textContent = JSON.stringify(run.manifest, null, 2);
  const names = (await api(`/runs/${id}/metric-names`).catch(() => ({ data: [] }))).data;
  const wanted = names.filter((n) => [LOSS, THEORY, LAMBDA_MIN, METRICS.lambdaMax].includes(n) || n.startsWith(METRICS.movement));
  if (wanted.length) {
    for (const s of await readPages(`/runs/${id}/metrics`, metricQuery(wanted, RUN_POINTS))) runView.series.set(s.metric, s);
  }
  fillChooser(runChooser, names, "ntk_rel_change");
  drawRun();
  drawRunChosen();
  loadRunAnalysis();
  loadRunMetrics(names);
  if (!FINAL.has(run.status)) openRunStream(id);
}

function renderRunHead(run) {
  const where = run.sweep_id === null ? "external" : `sweep #${run.sweep_id}`;
  document.getElementById("run-title").replaceChildren(`Run #${run.id} (`, run.sweep_id === null ? where : el("a", { href: `#sweep=${run.sweep_id}` }, where), ")");
  const badge = document.getElementById("run-status");
  badge.textContent = run.cancel_requested && run.status === "running" ? "running, cancel requested" : run.status;
  badge.className = `badge status-${run.status}`;
  badge.title = run.error || "";
  document.getElementById("cancel").hidden = FINAL.has(run.status) || run.cancel_requested;
  document.getElementById("run-params").textContent = Object.entries(run.overrides || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(" ");
}

async function cancelRun() {
  const note = document.getElementById("cancel-note");
  try {
    const run = await api(`/runs/${runView.id}/cancel`, { method: "POST" });
    runView.run = run;
    renderRunHead(run);
    note.textContent = run.status === "running" ? "the dispatcher stops it at its next batch" : "";
  } catch (error) {
    note.textContent = `cancel refused: ${error.message}`;
  }
}

function openRunStream(id) {
  const query = new URLSearchParams();
  [LOSS, THEORY, LAMBDA_MIN, METRICS.lambdaMax].forEach((name) => query.append("name", name));
  const source = new EventSource(`${API}/runs/${id}/metrics/stream?${query}`);
  runView.source = source;
  source.addEventListener("metrics", (event) => {
    for (const p of JSON.parse(event.data).points) {
      if (!runView.series.has(p.metric)) runView.series.set(p.metric, { metric: p.metric, x: [], y: [] });
      const s = runView.series.get(p.metric);
      if (!s.x.length || p.step > s.x[s.x.length - 1]) {
        s.x.push(p.step);
        s.y.push(number(p.value));
      }
    }
    drawRun();
  });
  source.addEventListener("status", (event) => {
    const data = JSON.parse(event.data);
    Object.assign(runView.run, { status: data.status, error: data.error });
    renderRunHead(runView.run);
  });
  source.addEventListener("end", () => {
    source.close();
    loadRunAnalysis();
  });
}

function drawRun() {
  drawRunLoss();
  drawRunLambda();
  drawRunMovement();
}

function drawNamed(figure, names, styles) {
  const shown = names.filter((name) => runView.series.has(name));
  const series = shown.map((name, i) => ({ label: labelOf(name), ...styles(name, i) }));
  figure.render(shown.map((name) => runView.series.get(name)), series, series.map((s) => ({ label: s.label, stroke: s.stroke, dash: s.dash })));
}

function drawRunLoss() {
  drawNamed(runView.figures.loss, [LOSS, THEORY], (name) => ({ stroke: COLORS[1], dash: name === THEORY ? THEORY_DASH : [] }));
}

function drawRunLambda() {
  drawNamed(runView.figures.lambda, [LAMBDA_MIN, METRICS.lambdaMax], (name, i) => ({ stroke: CATEGORY_COLORS[i], dash: [] }));
}

function drawRunMovement() {
  const layers = [...runView.series.keys()].filter((name) => name.startsWith(METRICS.movement));
  drawNamed(runView.figures.movement, layers, (name, i) => ({ stroke: CATEGORY_COLORS[i % CATEGORY_COLORS.length], dash: [] }));
}

async function drawRunChosen() {
  const id = runView.id;
  const metric = runChooser.value;
  if (!metric || id === null) return;
  const series = await readPages(`/runs/${id}/metrics`, metricQuery([metric], RUN_POINTS)).catch(() => []);
  if (id !== runView.id || metric !== runChooser.value) return;
  runView.figures.chooser.render(series, [{ label: labelOf(metric), stroke: COLORS[2] }], [{ label: labelOf(metric), stroke: COLORS[2] }]);
}

// -- analysis and tables -------------------------------------------------------------------------

function valueText(value) {
  if (typeof value === "boolean") return value ? "yes" : "no";
  return fmt(value);
}

function keyValueTable(title, entries) {
  return el(
    "table",
    { class: "kv" },
    el("caption", {}, title),
    el("tbody", {}, ...entries.map(([key, value]) => el("tr", { "data-key": key }, el("th", { title: key }, labelOf(key)), el("td", { class: "num" }, valueText(value))))),
  );
}

function regimeTable(regime) {
  const verdict = { true: "ok", false: "violated", null: "—" };
  return el(
    "table",
    { class: "regime" },
    el("caption", {}, `regime of the theorems: ${regime.in_regime === null ? "unknown" : regime.in_regime ? "in regime" : "out of regime"}`),
    el("thead", {}, el("tr", {}, el("th", {}, "check"), el("th", {}, "verdict"), el("th", {}, "value"), el("th", {}, "the papers assume"))),
    el(
      "tbody",
      {},
      ...regime.checks.map((c) => el("tr", { class: c.ok === false ? "bad" : "", "data-check": c.name }, el("td", {}, c.name), el("td", {}, verdict[c.ok]), el("td", { class: "num" }, valueText(c.value)), el("td", {}, c.requirement))),
    ),
  );
}

function layersTable(layers) {
  const table = document.getElementById("run-layers");
  const keys = [...new Set(Object.values(layers).flatMap((values) => Object.keys(values)))];
  table.querySelector("thead").replaceChildren(el("tr", {}, el("th", {}, "layer"), ...keys.map((key) => el("th", { title: key }, labelOf(`${key}/`).replace(/, $/, "")))));
  table.querySelector("tbody").replaceChildren(
    ...Object.entries(layers).map(([layer, values]) => el("tr", { "data-layer": layer }, el("td", {}, layer), ...keys.map((key) => el("td", { class: "num" }, fmt(values[key]))))),
  );
}

async function loadRunAnalysis() {
  const id = runView.id;
  let analysis;
  try {
    analysis = await api(`/runs/${id}/analysis`);
  } catch (error) {
    document.getElementById("run-analysis").replaceChildren(el("p", { class: "muted" }, `analysis unavailable: ${error.message}`));
    return;
  }
  if (id !== runView.id) return;
  document.getElementById("run-flags").replaceChildren(...(analysis.flags || []).map((f) => el("li", { "data-flag": f.name }, el("strong", {}, f.name), `: ${f.message}`)));
  const tables = Object.entries(ANALYSIS_SECTIONS).map(([section, keys]) => keyValueTable(section, keys.map((key) => [key, (analysis[section] || {})[key]])));
  const summary = keyValueTable("run", [["initial_loss", analysis.initial_loss], ["final_loss", analysis.final_loss], ["steps_done", analysis.steps_done]]);
  document.getElementById("run-analysis").replaceChildren(summary, ...tables, regimeTable(analysis.regime));
  layersTable(analysis.movement.layers);
}

async function loadRunMetrics(names) {
  const id = runView.id;
  const body = document.querySelector("#run-metrics tbody");
  if (!names.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "no metrics yet")));
    return;
  }
  const series = await readPages(`/runs/${id}/metrics`, metricQuery([], 4)).catch(() => []); // first, last, min, max
  if (id !== runView.id) return;
  body.replaceChildren(
    ...series.map((s) => {
      const finite = s.y.filter(Number.isFinite);
      return el(
        "tr",
        { "data-metric": s.metric },
        el("td", {}, s.metric),
        el("td", {}, labelOf(s.metric) === s.metric ? "" : labelOf(s.metric)),
        el("td", { class: "num" }, s.x[0]),
        el("td", { class: "num" }, s.x[s.x.length - 1]),
        el("td", { class: "num" }, fmt(s.y[s.y.length - 1])),
        el("td", { class: "num" }, finite.length ? fmt(Math.min(...finite)) : ""),
        el("td", { class: "num" }, finite.length ? fmt(Math.max(...finite)) : ""),
      );
    }),
  );
}
