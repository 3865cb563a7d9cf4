// overparam dashboard, shared parts: the REST helper, number formatting, the quantities'
// labels (services/quantities.py, the same the PNG plots and the CLI show) and line charts.
//
// Charts are uPlot with a log axis we tick ourselves: uPlot's own log splits throw
// "RangeError: Invalid array length" for data spanning more decades than it can tick (a loss
// that converges to 1e-30), which leaves the chart blank. We give the scale whole decades as
// its range and at most ~6 decade ticks, each labelled once.
"use strict";

const API = "/api/v1";
const CATALOGUE = JSON.parse(document.getElementById("quantities").textContent);
const METRICS = CATALOGUE.metrics;
const FINAL = new Set(["succeeded", "diverged", "failed", "cancelled"]);
const COLORS = ["#440154", "#414487", "#2a788e", "#22a884", "#7ad151", "#bddf26"];
const CATEGORY_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
const DASHES = [[], [10, 3, 2, 3], [2, 3], [12, 3, 2, 3, 2, 3]]; // a second parameter
const THEORY_DASH = [6, 4]; // dashed: the theory's prediction, nothing else
const CHART_HEIGHT = 280;
const MAX_LOG_TICKS = 6;

async function api(path, options = {}) {
  const response = await fetch(API + path, { headers: { accept: "application/json" }, ...options });
  if (response.status === 401) showLogin(); // the service requires a token: ask for one
  if (!response.ok) {
    let detail = "";
    try {
      detail = (await response.json()).detail || "";
    } catch (error) {
      detail = response.statusText;
    }
    const error = new Error(`${response.status} ${detail}`);
    error.status = response.status;
    throw error;
  }
  return response.json();
}

// A request that needs a token has shown the sign-in form: that is its answer, not an error.
window.addEventListener("unhandledrejection", (event) => {
  if (event.reason?.status === 401) event.preventDefault();
});

// The token goes into a same-site, HttpOnly session cookie (event streams cannot send headers).
function showLogin() {
  const form = document.getElementById("login");
  if (!form || !form.hidden) return;
  form.hidden = false;
  form.onsubmit = async (event) => {
    event.preventDefault();
    const token = form.querySelector("input").value.trim();
    const response = await fetch(API + "/session", {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
      body: JSON.stringify({ token }),
    });
    if (response.ok) location.reload();
    else form.querySelector(".error").textContent = "that token was refused";
  };
}

function number(value) {
  return typeof value === "string" ? Number(value) : value; // "NaN", "Infinity", "-Infinity"
}

// 3 significant digits, with an exponent below 1e-4 or from 1e3 (as the CLI prints them).
function fmt(value) {
  if (value === null || value === undefined) return "";
  if (typeof value !== "number") return String(value);
  if (!Number.isFinite(value)) return String(value).replace("Infinity", "inf").replace("NaN", "nan");
  if (Number.isInteger(value) && Math.abs(value) < 1e6) return String(value);
  const exponent = value === 0 ? 0 : Math.floor(Math.log10(Math.abs(value)));
  return exponent < -4 || exponent >= 3 ? value.toExponential(2) : String(Number(value.toPrecision(3)));
}

function labelOf(name) {
  if (name in CATALOGUE.names) return CATALOGUE.names[name];
  for (const [prefix, text] of Object.entries(CATALOGUE.prefixes)) {
    if (name.startsWith(prefix)) return `${text}, ${name.slice(prefix.length)}`;
  }
  return name;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "style" || key.startsWith("data-") || key.startsWith("aria-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function decade(exponent) {
  return Number(`1e${exponent}`); // exact decimal, unlike 10 ** -30
}

// A log axis: whole decades around data spanning a decade or more (at most ~6 decade ticks);
// within a decade, the data's range with a few evenly spaced ticks. Never empty, never ≤ 0.
function logRange(u, min, max) {
  if (!(min > 0 && Number.isFinite(min))) min = max > 0 && Number.isFinite(max) ? max / 10 : 1e-3;
  if (!(max > 0 && Number.isFinite(max))) max = min * 10;
  if (max / min < 10) return min === max ? [min / 1.1, max * 1.1] : [min / 1.02, max * 1.02];
  const low = Math.floor(Math.log10(min));
  const high = Math.max(Math.ceil(Math.log10(max)), low + 1);
  return [decade(low), decade(high)];
}

function niceStep(span, count) {
  const raw = span / count;
  const power = decade(Math.floor(Math.log10(raw)));
  return [1, 2, 2.5, 5, 10].map((m) => m * power).find((step) => step >= raw);
}

function logSplits(u, axis, min, max) {
  if (max / min < 10 * (1 - 1e-9)) {
    const step = niceStep(max - min, 4);
    const splits = [];
    for (let v = Math.ceil(min / step) * step; v <= max; v += step) splits.push(Number(v.toPrecision(12)));
    return splits;
  }
  const low = Math.round(Math.log10(min));
  const high = Math.round(Math.log10(max));
  const step = Math.max(1, Math.ceil((high - low) / MAX_LOG_TICKS));
  const splits = [];
  for (let e = Math.ceil(low / step) * step; e <= high; e += step) splits.push(decade(e));
  return splits;
}

// Tick labels, each distinct: decades as 1e-30 (plainly from 0.01 to 1000), other ticks with
// the fewest significant digits that tell them apart.
function tickLabels(u, splits) {
  const decades = splits.every((v) => v > 0 && Number.isInteger(Math.round(Math.log10(v) * 1e9) / 1e9));
  if (decades) {
    return splits.map((v) => {
      const exponent = Math.round(Math.log10(v));
      return exponent >= -2 && exponent <= 3 ? String(decade(exponent)) : `1e${exponent}`;
    });
  }
  for (let digits = 2; digits < 12; digits++) {
    const labels = splits.map((v) => String(Number(v.toPrecision(digits))));
    if (new Set(labels).size === labels.length) return labels;
  }
  return splits.map(String);
}

// One line chart in `container`: series [{label, stroke, dash, width}], data in uPlot's
// columnar layout. Its width follows the container's.
class LineChart {
  constructor(container, { series, data, log, xLabel = "step k" }) {
    this.container = container;
    const y = log
      ? { scale: { distr: 3, log: 10, range: logRange }, axis: { size: 64, splits: logSplits, values: tickLabels, filter: (u, splits) => splits } }
      : { scale: {}, axis: { size: 72 } };
    const options = {
      width: this.width(),
      height: CHART_HEIGHT,
      scales: { x: { time: false }, y: y.scale },
      axes: [{ label: xLabel, size: 44 }, y.axis],
      legend: { show: false }, // ours, by parameter value, sits under the chart
      series: [{ label: "step" }, ...series.map((s) => ({ width: 1.5, spanGaps: true, ...s }))],
    };
    this.plot = new uPlot(options, data, container);
    this.resizer = new ResizeObserver(() => this.plot.setSize({ width: this.width(), height: CHART_HEIGHT }));
    this.resizer.observe(container);
  }

  width() {
    return Math.max(280, this.container.clientWidth || 600);
  }

  setData(data) {
    this.plot.setData(data);
  }

  destroy() {
    this.resizer.disconnect();
    this.plot.destroy();
  }
}

// The values a chart may plot on a log axis: positive and finite, else a gap.
function plottable(value, log) {
  const v = number(value);
  return Number.isFinite(v) && (!log || v > 0) ? v : null;
}

// A figure's chart, rebuilt when its series change and kept otherwise; its caption, its
// legend and a log/linear switch around it.
class Figure {
  constructor(figure, { log = true, caption = "" } = {}) {
    this.figure = figure;
    this.container = figure.querySelector(".chart");
    this.legendBox = figure.querySelector(".legend");
    this.log = log;
    this.chart = null;
    this.signature = null;
    this.draw = null;
    if (caption) figure.querySelector("figcaption").textContent = caption;
    this.switch = el("button", { type: "button", class: "scale-switch", "data-scale": log ? "log" : "linear", title: "switch between a log and a linear y axis" });
    this.switch.textContent = log ? "log axis" : "linear axis";
    this.switch.addEventListener("click", () => this.setLog(!this.log));
    figure.querySelector("figcaption").append(this.switch);
  }

  setLog(log) {
    this.log = log;
    this.switch.dataset.scale = log ? "log" : "linear";
    this.switch.textContent = log ? "log axis" : "linear axis";
    this.reset();
    if (this.draw) this.draw();
  }

  reset() {
    if (this.chart) this.chart.destroy();
    this.chart = null;
    this.signature = null;
  }

  // tables: [{x: [...], y: [...]}] one per series; series: uPlot series options.
  render(tables, series, legend) {
    this.container.dataset.points = tables.reduce((n, t) => n + t.x.length, 0);
    const data = tables.length
      ? uPlot.join(tables.map((t) => [t.x, t.y.map((v) => plottable(v, this.log))]))
      : [[]];
    const signature = series.map((s) => `${s.label}|${s.stroke}|${s.dash}`).join(";");
    if (this.chart && this.signature === signature) {
      this.chart.setData(data);
      return;
    }
    this.reset();
    this.renderLegend(legend);
    if (!tables.length) return;
    this.chart = new LineChart(this.container, { series, data, log: this.log });
    this.signature = signature;
  }

  // entries: [{label, stroke, dash}]: a line sample in the series' colour and dash each.
  renderLegend(entries) {
    this.legendBox.replaceChildren(...entries.map((entry) => el("span", { class: "legend-entry" }, lineSample(entry), entry.label)));
  }
}

function lineSample({ stroke, dash }) {
  const svg = "http://www.w3.org/2000/svg";
  const sample = document.createElementNS(svg, "svg");
  sample.setAttribute("width", "26");
  sample.setAttribute("height", "10");
  const line = document.createElementNS(svg, "line");
  const attributes = { x1: 1, y1: 5, x2: 25, y2: 5, stroke, "stroke-width": 2 };
  if (dash && dash.length) attributes["stroke-dasharray"] = dash.join(" ");
  for (const [key, value] of Object.entries(attributes)) line.setAttribute(key, value);
  sample.append(line);
  return sample;
}

// Colours for the values of one parameter (viridis for numbers, categories otherwise).
function palette(values) {
  const distinct = [...new Set(values.map((v) => JSON.stringify(v)))].map((v) => JSON.parse(v));
  const numeric = distinct.every((v) => typeof v === "number");
  if (numeric) distinct.sort((a, b) => a - b);
  const colorOf = (value) => {
    const index = distinct.findIndex((v) => JSON.stringify(v) === JSON.stringify(value));
    if (!numeric) return CATEGORY_COLORS[Math.max(0, index) % CATEGORY_COLORS.length];
    const t = distinct.length > 1 ? index / (distinct.length - 1) : 0.5;
    return COLORS[Math.min(COLORS.length - 1, Math.round(t * (COLORS.length - 1)))];
  };
  return { values: distinct, colorOf };
}

function dashes(values) {
  const distinct = [...new Set(values.map((v) => JSON.stringify(v)))];
  return { values: distinct.map((v) => JSON.parse(v)), dashOf: (value) => DASHES[Math.max(0, distinct.indexOf(JSON.stringify(value))) % DASHES.length] };
}

// Every point of a paged metrics read, grouped by (run, metric) here: pages may come in any
// metric order.
async function readPages(path, query) {
  const grouped = new Map();
  let cursor = null;
  do {
    const params = new URLSearchParams(query);
    if (cursor) params.set("cursor", cursor);
    const page = await api(`${path}?${params}`);
    for (const p of page.data) {
      const key = `${p.run_id ?? ""}|${p.metric}`;
      if (!grouped.has(key)) grouped.set(key, { runId: p.run_id, metric: p.metric, x: [], y: [] });
      const s = grouped.get(key);
      s.x.push(p.step);
      s.y.push(number(p.value));
    }
    cursor = page.next_cursor;
  } while (cursor);
  for (const s of grouped.values()) sortSeries(s);
  return [...grouped.values()];
}

function sortSeries(s) {
  const order = s.x.map((_, i) => i).sort((a, b) => s.x[a] - s.x[b]);
  s.x = order.map((i) => s.x[i]);
  s.y = order.map((i) => s.y[i]);
}

function metricQuery(names, maxPoints) {
  const query = new URLSearchParams({ max_points: maxPoints, limit: 100000 });
  for (const name of names) query.append("name", name);
  return query;
}

// Fill a <select> with metric names (labelled), keeping the current choice when it is there.
function fillChooser(select, names, preferred) {
  const current = select.value || preferred;
  select.replaceChildren(...names.map((name) => el("option", { value: name }, `${name} — ${labelOf(name)}`)));
  if (names.includes(current)) select.value = current;
}
