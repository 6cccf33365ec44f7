// spinjax view: the page. Plain JavaScript, no build step; plots by plotly.js (served locally).
//
// State (model, matrix, statistic, step, layer, head and the display choices) lives in `S` and
// in the URL's query string, so a view can be shared and reloaded. Data come from the server's
// JSON endpoints (/api/...), each asked for only what a panel shows.
"use strict";

const S = {};            // the current selection (see readURL for the keys)
let META = null;         // /api/meta: the store's models, finished steps, variables, edges
const DATA = {};         // what the panels show now: overview, head, trajectory, pairs, null
const tokens = {};       // per panel, the latest request: older answers are dropped
// Started before plotly.js is parsed: the metadata, then the first overview's data.
const boot = fetch("/api/meta").then(answer).then((meta) => {
  META = meta;
  readURL();
  if (!Object.keys(META.models).length) return null;
  normalise();
  return model().steps.length ? overviewRequest() : null;
});

const PLOT_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"] };
const FONT = { family: "system-ui, sans-serif", size: 11 };
const COLORS = { data: "#1f5fae", gauss: "#d1495b", fit: "#2a9d3f", band: "rgba(120,120,120,0.25)", mark: "#e4572e" };

// ---- server ---------------------------------------------------------------------------------

async function answer(response) {
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function api(path, params) {
  return fetch(path + "?" + new URLSearchParams(params)).then(answer);
}

// Run `load` for panel `name`; its result reaches `draw` only if no newer request was made.
async function latest(name, load, draw) {
  const token = (tokens[name] = (tokens[name] || 0) + 1);
  try {
    const data = await load();
    if (token === tokens[name]) await draw(data);
  } catch (err) {
    if (token === tokens[name]) showError(err);
  }
}

function showError(err) {
  const info = document.getElementById("info");
  info.innerHTML = "";
  const span = document.createElement("span");
  span.className = "error";
  span.textContent = "error: " + err.message;
  info.appendChild(span);
}

// ---- state and URL ----------------------------------------------------------------------------

const KEYS = ["model", "matrix", "stat", "step", "layer", "head", "view", "log", "pair", "vector"];

function readURL() {
  const q = new URLSearchParams(location.search);
  for (const key of KEYS) if (q.has(key)) S[key] = q.get(key);
}

function writeURL() {
  const q = new URLSearchParams();
  for (const key of KEYS) if (S[key] !== undefined && S[key] !== null) q.set(key, S[key]);
  history.replaceState(null, "", "?" + q.toString());
}

function model() { return META.models[S.model]; }

// Bring S in line with the store: unknown values fall back to defaults.
function normalise() {
  const names = Object.keys(META.models);
  if (!names.includes(S.model)) S.model = names[0];
  const m = model();
  const pick = (value, allowed, fallback) => (allowed.includes(value) ? value : fallback);
  S.matrix = pick(S.matrix, m.matrices, m.matrices.includes("W_QK") ? "W_QK" : m.matrices[0]);
  S.stat = pick(S.stat, m.statistics, m.statistics.includes("std") ? "std" : m.statistics[0]);
  const int = (value, n, fallback) => {
    const i = Number(value);
    return Number.isInteger(i) && i >= 0 && i < n ? i : fallback;
  };
  S.layer = int(S.layer, m.layers, 0);
  S.head = int(S.head, m.heads, 0);
  const step = Number(S.step);
  S.step = m.steps.includes(step) && S.step !== "" ? step : m.steps[m.steps.length - 1];
  S.view = pick(S.view, ["layer", "step"], "layer");
  S.log = S.log === "1" || S.log === 1 ? 1 : 0;
  S.pair = pick(S.pair, m.pairs, m.pairs.includes("qk_cosine") ? "qk_cosine" : m.pairs[0]);
  S.vector = pick(S.vector, m.vectors, m.vectors.includes("singular_values") ? "singular_values" : m.vectors[0]);
}

// ---- controls -----------------------------------------------------------------------------------

function fillSelect(id, values, current) {
  const select = document.getElementById(id);
  select.innerHTML = "";
  const groups = {};
  for (const value of values) {
    const option = new Option(value, value, false, String(value) === String(current));
    const group = typeof value === "string" && value.endsWith("_z") ? "z-scores against the null" : null;
    if (group) {
      if (!groups[group]) {
        groups[group] = document.createElement("optgroup");
        groups[group].label = group;
      }
      groups[group].appendChild(option);
    } else {
      select.appendChild(option);
    }
  }
  for (const g of Object.values(groups)) select.appendChild(g);
  select.disabled = values.length === 0;
}

function fillControls() {
  const m = model();
  document.getElementById("store").textContent = META.store;
  fillSelect("model", Object.keys(META.models), S.model);
  fillSelect("matrix", m.matrices, S.matrix);
  fillSelect("stat", m.statistics, S.stat);
  fillSelect("layer", [...Array(m.layers).keys()], S.layer);
  fillSelect("pair", m.pairs, S.pair);
  fillSelect("vector", m.vectors, S.vector);
  document.getElementById("p-pairs").hidden = m.pairs.length === 0;
  document.querySelector("main").classList.toggle("no-pairs", m.pairs.length === 0);
  for (const radio of document.querySelectorAll("input[name=view]")) radio.checked = radio.value === S.view;
  document.getElementById("log").checked = S.log === 1;
  const slider = document.getElementById("step");
  slider.max = Math.max(m.steps.length - 1, 0);
  slider.value = Math.max(m.steps.indexOf(S.step), 0);
  slider.disabled = m.steps.length < 2;
  const pending = m.requested - m.steps.length;
  document.getElementById("status").textContent =
    `${m.steps.length} finished step${m.steps.length === 1 ? "" : "s"}` +
    (pending > 0 ? ` (${pending} requested, not finished)` : "");
  showStep();
}

// A step's revision as shown: a local checkpoint's path by its last part.
function revision(m, i) {
  const parts = String(m.revisions[i]).split("/").filter((p) => p);
  return parts.length ? parts[parts.length - 1] : String(m.revisions[i]);
}

function showStep() {
  const m = model();
  const i = m.steps.indexOf(S.step);
  document.getElementById("steplabel").textContent =
    i < 0 ? "no finished step" : `${S.step}  (${revision(m, i)}; ${i + 1} of ${m.steps.length})`;
}

function bindControls() {
  const on = (id, event, fn) => document.getElementById(id).addEventListener(event, fn);
  on("model", "change", (e) => { S.model = e.target.value; S.step = S.matrix = S.stat = S.pair = S.vector = null; start(); });
  on("matrix", "change", (e) => { S.matrix = e.target.value; changed({ overview: 1, head: 1, trajectory: 1, null: 1 }); });
  on("stat", "change", (e) => { S.stat = e.target.value; changed({ overview: 1, trajectory: 1 }); });
  on("layer", "change", (e) => { S.layer = Number(e.target.value); changed({ overview: 1, head: 1, trajectory: 1, pairs: 1 }); });
  for (const radio of document.querySelectorAll("input[name=view]")) {
    radio.addEventListener("change", (e) => { S.view = e.target.value; changed({ overview: 1 }); });
  }
  on("log", "change", (e) => { S.log = e.target.checked ? 1 : 0; changed({ histograms: 1 }); });
  on("pair", "change", (e) => { S.pair = e.target.value; changed({ pairs: 1 }); });
  on("vector", "change", (e) => { S.vector = e.target.value; changed({ spectrum: 1 }); });
  let sliding = null;  // while the slider moves, redraw once it rests for 60 ms
  on("step", "input", (e) => {
    S.step = model().steps[Number(e.target.value)];
    showStep();
    clearTimeout(sliding);
    sliding = setTimeout(() => changed({ step: 1 }), 60);
  });
  on("refresh", "click", () => start());
}

// What to redraw after a change; the URL follows every change.
function changed(what) {
  writeURL();
  if (what.step) {
    if (S.view === "step") drawOverview(); else markOverview();
    drawHead(); drawPairs(); markTrajectory();
    return;
  }
  if (what.overview) drawOverview();
  if (what.head) drawHead();
  if (what.trajectory) drawTrajectory();
  if (what.pairs) drawPairs();
  if (what.null) loadNull().then(() => DATA.head && plotHistograms(DATA.head));
  if (what.histograms && DATA.head) plotHistograms(DATA.head);
  if (what.spectrum && DATA.head) plotSpectrum(DATA.head);
}

// Select a head (and a step or a layer): what a click on a heatmap cell does.
function select({ head, step, layer }) {
  const layerChanged = layer !== undefined && layer !== S.layer;
  const stepChanged = step !== undefined && step !== S.step;
  if (head !== undefined) S.head = head;
  if (layerChanged) {
    S.layer = layer;
    document.getElementById("layer").value = layer;
  }
  if (stepChanged) {
    S.step = step;
    document.getElementById("step").value = model().steps.indexOf(step);
    showStep();
  }
  writeURL();
  if (stepChanged && S.view === "step") drawOverview(); else markOverview();
  // the head's histograms and spectrum first; the trajectory and the pairs follow
  const drawn = drawHead();
  drawn.then(() => {
    drawTrajectory();
    if (stepChanged || layerChanged) drawPairs(); else markPairs();
  });
  return drawn;
}

// ---- formatting -----------------------------------------------------------------------------

function fmt(v) {
  if (v === null || v === undefined) return "n/a";
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1e4 || a < 1e-3 ? v.toExponential(3) : Number(v.toPrecision(4)).toString();
}

// Ticks of a log axis over [lo, hi]: 1, 2, 5 per decade over short spans, decades over long ones,
// labelled in full (plotly's own log ticks label 0.5 as "5").
function logTicks(lo, hi) {
  const first = Math.floor(Math.log10(lo)), last = Math.ceil(Math.log10(hi));
  const mantissas = last - first > 3 ? [1] : [1, 2, 5];
  const vals = [];
  for (let k = first; k <= last; k++) for (const m of mantissas) {
    const v = m * 10 ** k;
    if (v >= lo && v <= hi) vals.push(Number(v.toPrecision(1)));
  }
  const text = (v) => (v < 1e-3 || v >= 1e4 ? v.toExponential(0).replace("e+", "e") : String(v));
  return vals.length < 2 ? {} : { tickvals: vals, ticktext: vals.map(text) };
}

function short(v) { return v !== 0 && Math.abs(v) < 0.01 ? v.toExponential(1) : v.toPrecision(2); }

function baseLayout(title, extra = {}) {
  return Object.assign({
    title: { text: title, font: { size: 12 }, x: 0.01, xanchor: "left", y: 0.985, yanchor: "top" },
    margin: { l: 56, r: 12, t: 30, b: 40 }, font: FONT, hovermode: "closest",
    legend: { orientation: "h", x: 0, y: -0.2, font: { size: 10 } },
    paper_bgcolor: "#fff", plot_bgcolor: "#fff",
  }, extra);
}

// Colours of a heatmap: diverging around 0 for z-scores and cosines, log10 for positive values
// spanning more than 30x, linear otherwise. Returns the values to colour and the trace options.
function colourScale(name, values) {
  const flat = values.flat().filter((v) => v !== null && Number.isFinite(v));
  const lo = flat.reduce((a, b) => Math.min(a, b), Infinity), hi = flat.reduce((a, b) => Math.max(a, b), -Infinity);
  if (name.endsWith("_z") || name === "qk_cosine") {
    const amp = name === "qk_cosine" ? 1 : Math.max(1e-9, Math.abs(lo), Math.abs(hi));
    return { z: values, opts: { colorscale: "RdBu", reversescale: true, zmid: 0, zmin: -amp, zmax: amp }, title: name };
  }
  if (flat.length && lo > 0 && hi / lo > 30) {
    const z = values.map((row) => row.map((v) => (v === null || v <= 0 ? null : Math.log10(v))));
    const ticks = [];
    for (let k = Math.ceil(Math.log10(lo)); k <= Math.floor(Math.log10(hi)); k++) ticks.push(k);
    return { z, opts: { colorscale: "Viridis", colorbar: { tickvals: ticks, ticktext: ticks.map((k) => `1e${k}`) } }, title: name + " (log)" };
  }
  return { z: values, opts: { colorscale: "Viridis" }, title: name };
}

// ---- the overview heatmap ---------------------------------------------------------------------

function overviewRequest() {
  const base = { model: S.model, matrix: S.matrix, stat: S.stat };
  return S.view === "layer" ? api("/api/layer", { ...base, layer: S.layer }) : api("/api/step", { ...base, step: S.step });
}

function drawOverview(request = null) {
  return latest("overview", () => request || overviewRequest(), plotOverview);
}

async function plotOverview(d) {
  const byLayer = d.layer !== undefined;  // heads x steps of a layer, else layers x heads of a step
  const x = byLayer ? d.steps.map(String) : d.heads.map(String);
  const y = byLayer ? d.heads : d.layers;
  const scale = colourScale(d.stat, d.values);
  const text = d.values.map((row) => row.map(fmt));
  const hover = byLayer ? "step %{x}<br>head %{y}<br>" : "layer %{y}<br>head %{x}<br>";
  const trace = {
    type: "heatmap", x, y, z: scale.z, customdata: d.values, text, hovertemplate: hover + d.stat + " = %{text}<extra></extra>",
    xgap: x.length <= 40 ? 1 : 0, ygap: y.length <= 40 ? 1 : 0, hoverongaps: false,
    ...scale.opts, colorbar: { thickness: 12, title: { text: scale.title, side: "right" }, ...(scale.opts.colorbar || {}) },
  };
  const title = byLayer
    ? `${d.stat} of ${d.matrix}, layer ${d.layer}: every head at every finished step (click a cell)`
    : `${d.stat} of ${d.matrix}, step ${d.step}: every head of every layer (click a cell)`;
  const layout = baseLayout(title, {
    // A fixed margin that fits six-digit steps at -45 degrees: automargin would lay the plot
    // out twice, which is most of the first paint's drawing time.
    xaxis: { title: { text: byLayer ? "training step" : "head" }, type: "category", tickangle: byLayer ? -45 : 0 },
    yaxis: { title: { text: byLayer ? "head" : "layer" }, autorange: "reversed", dtick: y.length > 24 ? 4 : 1 },
    margin: { l: 56, r: 12, t: 30, b: byLayer ? 78 : 44 },
  });
  DATA.overview = { ...d, x, y, byLayer, model: S.model };
  layout.shapes = overviewMarks();  // drawn with the heatmap, not by a second layout pass
  const div = document.getElementById("overview");
  await Plotly.react(div, [trace], layout, PLOT_CONFIG);
  document.body.dataset.overviewDrawn = `${d.matrix}/${d.stat}/` + (byLayer ? `layer${d.layer}` : `step${d.step}`);
  if (!div.dataset.bound) {
    div.dataset.bound = "1";
    div.on("plotly_click", (e) => onOverviewClick(e.points[0].pointIndex));
  }
  if (document.body.dataset.ready !== "true") {
    requestAnimationFrame(() => {
      document.body.dataset.readyAt = String(performance.now());
      document.body.dataset.ready = "true";
    });
  }
}

// pointIndex of a heatmap cell is [row, column].
function onOverviewClick([row, col]) {
  const o = DATA.overview;
  if (o.byLayer) return select({ head: o.y[row], step: o.steps[col] });
  return select({ layer: o.y[row], head: o.heads[col] });
}

function markOverview() {
  if (DATA.overview) Plotly.relayout("overview", { shapes: overviewMarks() });
}

// The selected cell of the overview, and thin guides along its row and column.
function overviewMarks() {
  const o = DATA.overview;
  const col = o.byLayer ? o.steps.indexOf(S.step) : S.head;
  const row = o.byLayer ? S.head : S.layer;
  // a cell of 154 steps is a few pixels wide: the guides find it
  const guide = { line: { color: COLORS.mark, width: 1, dash: "dot" }, xref: "x", yref: "y", layer: "above" };
  const shapes = [
    { type: "line", x0: -0.5, x1: o.x.length - 0.5, y0: row, y1: row, ...guide },
    { type: "line", x0: col, x1: col, y0: -0.5, y1: o.y.length - 0.5, ...guide },
    { type: "rect", x0: col - 0.5, x1: col + 0.5, y0: row - 0.5, y1: row + 0.5, line: { color: COLORS.mark, width: 2.5 }, xref: "x", yref: "y" },
  ];
  return col < 0 ? [] : shapes;
}

// ---- one head: histograms and spectrum ------------------------------------------------------------

function drawHead() {
  const params = { model: S.model, matrix: S.matrix, step: S.step, layer: S.layer, head: S.head };
  return latest("head", () => api("/api/head", params), async (d) => {
    DATA.head = d;
    showInfo();
    await Promise.all([plotHistograms(d), plotSpectrum(d)]);
    document.body.dataset.headDrawn = `${d.matrix}/${d.layer}/${d.head}/${d.step}`;
    APP.drawnAt = performance.now();
  });
}

function showInfo() {
  const d = DATA.head;
  if (!d) return;
  const m = model();
  const i = m.steps.indexOf(d.step);
  const keys = ["mean", "std", "skew", "kurt", "kl_gauss", "tail_mass", "stable_rank"].filter((k) => k in d.stats);
  const values = { ...d.stats };
  const t = DATA.trajectory;  // the chosen statistic at this step, from the trajectory
  if (!keys.includes(S.stat) && t && t.stat === S.stat && t.matrix === d.matrix && t.head === d.head && t.layer === d.layer) {
    keys.push(S.stat);
    values[S.stat] = t.values[t.steps.indexOf(d.step)];
  }
  const info = document.getElementById("info");
  info.innerHTML = "";
  const head = document.createElement("b");
  head.textContent = `${S.model} · ${d.matrix} · layer ${d.layer} · head ${d.head} · step ${d.step}` + (i >= 0 ? ` (${revision(m, i)})` : "");
  info.appendChild(head);
  info.appendChild(document.createTextNode("  —  " + keys.map((k) => `${k} ${fmt(values[k])}`).join(" · ")));
}

// Densities count / (n * width) of the inner bins (the two unbounded tail bins have none),
// trimmed to the occupied bins and, for wide histograms, merged into bins at least `minWidth`
// wide so that the log-spaced raw grid does not draw noise spikes near zero.
function densities(counts, edges, minWidth = 0) {
  const n = counts.reduce((a, b) => a + b, 0);
  let lo = 1, hi = counts.length - 2;
  while (lo <= hi && counts[lo] === 0) lo++;
  while (hi >= lo && counts[hi] === 0) hi--;
  if (n === 0 || lo > hi) return null;
  lo = Math.max(1, lo - 2); hi = Math.min(counts.length - 2, hi + 2);
  const x = [edges[lo]], y = [], c = [];
  let acc = 0, start = edges[lo];
  for (let i = lo; i <= hi; i++) {
    acc += counts[i];
    const end = edges[i + 1];
    if (end - start >= minWidth || i === hi) {
      x.push(end); c.push(acc); y.push(acc / (n * (end - start)));
      acc = 0; start = end;
    }
  }
  return { x, y: [...y, y[y.length - 1]], counts: [...c, c[c.length - 1]], n,
           tails: counts[0] + counts[counts.length - 1] };
}

function gaussian(xs, mu, sigma) {
  return xs.map((x) => Math.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * Math.sqrt(2 * Math.PI)));
}

function linspace(a, b, n) { return [...Array(n).keys()].map((i) => a + ((b - a) * i) / (n - 1)); }

function histogramPlot(id, title, xlabel, h, curves, band) {
  const div = document.getElementById(id);
  if (!h) {
    const layout = baseLayout(title, { annotations: [{ text: "no finite entries or no spread", showarrow: false, x: 0.5, y: 0.5, xref: "paper", yref: "paper" }],
                                        xaxis: { visible: false }, yaxis: { visible: false } });
    return Plotly.react(div, [], layout, PLOT_CONFIG);
  }
  const traces = [];
  if (band) traces.push(...band);
  traces.push({
    type: "scatter", mode: "lines", x: h.x, y: h.y, customdata: h.counts, line: { shape: "hv", color: COLORS.data, width: 1.3 },
    name: "store", hovertemplate: "%{x:.4g}: density %{y:.3g} (count %{customdata})<extra></extra>",
  });
  const xs = linspace(h.x[0], h.x[h.x.length - 1], 300);
  for (const [name, mu, sigma, color, dash] of curves) {
    if (Number.isFinite(mu) && Number.isFinite(sigma) && sigma > 0) {
      traces.push({ type: "scatter", mode: "lines", x: xs, y: gaussian(xs, mu, sigma), name, hoverinfo: "skip",
                    line: { color, width: 1.2, dash } });
    }
  }
  const positive = h.y.filter((v) => v > 0);
  const yaxis = { title: { text: "density" }, type: S.log ? "log" : "linear" };
  if (S.log && positive.length) {
    const lo = Math.min(...positive) * 0.3, hi = Math.max(...positive) * 3;
    Object.assign(yaxis, { range: [Math.log10(lo), Math.log10(hi)] }, logTicks(lo, hi));
  }
  const layout = baseLayout(title, {
    xaxis: { title: { text: xlabel }, range: [h.x[0], h.x[h.x.length - 1]] }, yaxis, showlegend: true,
    legend: { orientation: "h", x: 0, y: 1.0, yanchor: "bottom", font: { size: 10 }, traceorder: "normal" },
    margin: { l: 56, r: 12, t: 46, b: 40 },
  });
  if (h.tails) {  // entries in the two unbounded bins: counted, not drawn
    layout.annotations = [{ text: `beyond the grid: ${fmt((100 * h.tails) / h.n)}%`, showarrow: false, xref: "paper", yref: "paper",
                            x: 1, y: 1, xanchor: "right", yanchor: "top", font: { size: 10, color: "#5b6673" } }];
  }
  return Plotly.react(div, traces, layout, PLOT_CONFIG);
}

function plotHistograms(d) {
  const m = model();
  const s = d.stats;
  const std = s.std, mean = s.mean;
  const z = densities(d.zhist, m.edges.zhist);
  const zcurves = [["Gaussian", 0, 1, COLORS.gauss, "dash"]];
  if (std) zcurves.push(["core fit", (s.mu_fit - mean) / std, s.sigma_fit / std, COLORS.fit, "dot"]);
  let band = null;
  const nb = DATA.null;
  if (z && nb && nb.lower && nb.matrix === d.matrix) {
    const lo = z.x[0], hi = z.x[z.x.length - 1];
    const xe = [], yl = [], yu = [];
    const e = m.edges.zhist;
    for (let i = 1; i < e.length - 2; i++) {
      if (e[i] >= lo - 1e-9 && e[i + 1] <= hi + 1e-9 && nb.lower[i] !== null) { xe.push(e[i]); yl.push(nb.lower[i]); yu.push(nb.upper[i]); }
    }
    if (xe.length) {  // the last bin's right edge, for the step shape
      xe.push(xe[xe.length - 1] + (e[2] - e[1])); yl.push(yl[yl.length - 1]); yu.push(yu[yu.length - 1]);
    }
    const q = nb.quantiles.map((v) => Math.round(v * 100));
    band = [
      { type: "scatter", mode: "lines", x: xe, y: yu, line: { shape: "hv", width: 0 }, hoverinfo: "skip", showlegend: false },
      { type: "scatter", mode: "lines", x: xe, y: yl, line: { shape: "hv", width: 0 }, fill: "tonexty", fillcolor: COLORS.band,
        name: `null ${q[0]}–${q[1]}%`, hoverinfo: "skip" },
    ];
  }
  const raw = densities(d.hist, m.edges.hist);
  // merged into bins of at least 1/300 of the occupied range (the grid is log-spaced)
  const rawHist = raw && densities(d.hist, m.edges.hist, (raw.x[raw.x.length - 1] - raw.x[0]) / 300);
  const rcurves = [["Gaussian", mean, std, COLORS.gauss, "dash"],
                   ["core fit", s.mu_fit, s.sigma_fit, COLORS.fit, "dot"]];
  return Promise.all([
    histogramPlot("zhist", `${d.matrix}, z = (w − mean) / std`, "z", z, zcurves, band),
    histogramPlot("hist", `${d.matrix} entries`, `${d.matrix} entry`, rawHist, rcurves, null),
  ]);
}

function plotSpectrum(d) {
  const name = S.vector;
  const values = d.vectors[name] || [];
  const k = values.map((_, i) => i + 1);
  const isZ = name.endsWith("_z");
  const finite = values.filter((v) => v !== null);
  const positive = finite.length > 0 && finite.every((v) => v > 0);
  const trace = { type: "scatter", mode: values.length > 64 ? "lines" : "lines+markers", x: k, y: values, marker: { size: 4 },
                  line: { color: COLORS.data, width: 1.3 }, name, hovertemplate: "%{x}: %{y:.4g}<extra></extra>" };
  const layout = baseLayout(`${name} of ${d.matrix}`, {
    xaxis: { title: { text: "index (descending)" } },
    yaxis: Object.assign({ title: { text: name }, type: !isZ && positive ? "log" : "linear", zeroline: isZ },
                         !isZ && positive ? logTicks(Math.min(...finite), Math.max(...finite)) : {}),
    showlegend: false,
  });
  return Plotly.react("spectrum", [trace], layout, PLOT_CONFIG);
}

// ---- the null band ------------------------------------------------------------------------------

async function loadNull() {
  const m = model();
  if (!m.baseline) { DATA.null = null; return; }
  const matrix = S.matrix;
  const d = await api("/api/null", { model: S.model, matrix });
  DATA.null = { ...d, matrix };
}

// ---- the trajectory ------------------------------------------------------------------------------

function drawTrajectory() {
  const params = { model: S.model, matrix: S.matrix, stat: S.stat, layer: S.layer, head: S.head };
  return latest("trajectory", () => api("/api/trajectory", params), async (d) => {
    DATA.trajectory = { ...d, stat: params.stat, layer: params.layer, head: params.head, matrix: params.matrix };
    showInfo();
    const x = d.steps.map(String);
    const line = { type: "scatter", mode: d.steps.length > 60 ? "lines" : "lines+markers", x, y: d.values, name: S.stat,
                   line: { color: COLORS.data, width: 1.3 }, marker: { size: 4 }, hovertemplate: "step %{x}: %{y:.4g}<extra></extra>" };
    const layout = baseLayout(`${S.stat} of layer ${S.layer}, head ${S.head} through training`, {
      xaxis: { title: { text: "training step" }, type: "category", tickangle: -45, automargin: true },
      yaxis: { title: { text: S.stat } }, showlegend: false,
    });
    const v = d.values[0];
    if (d.values.length === 1 && v) layout.yaxis.range = [v - Math.abs(v), v + Math.abs(v)];  // one step: centred
    const div = document.getElementById("trajectory");
    await Plotly.react(div, [line, markTrace()], layout, PLOT_CONFIG);
    document.body.dataset.trajectoryDrawn = `${params.matrix}/${params.stat}/${params.layer}/${params.head}`;
    if (!div.dataset.bound) {
      div.dataset.bound = "1";
      div.on("plotly_click", (e) => select({ step: DATA.trajectory.steps[e.points[0].pointIndex] }));
    }
  });
}

function markTrace() {
  const d = DATA.trajectory;
  const i = d.steps.indexOf(S.step);
  return { type: "scatter", mode: "markers", x: i < 0 ? [] : [String(S.step)], y: i < 0 ? [] : [d.values[i]], name: "selected step",
           marker: { color: COLORS.mark, size: 10, symbol: "circle-open", line: { width: 2 } }, hoverinfo: "skip" };
}

function markTrajectory() {
  const div = document.getElementById("trajectory");
  if (!DATA.trajectory || !div.data || div.data.length !== 2) return;
  const mark = markTrace();
  Plotly.restyle(div, { x: [mark.x], y: [mark.y] }, [1]);
}

// ---- head pairs ---------------------------------------------------------------------------------

function drawPairs() {
  if (!model().pairs.length) return Promise.resolve();
  const params = { model: S.model, step: S.step, layer: S.layer, name: S.pair };
  return latest("pairs", () => api("/api/pairs", params), (d) => { DATA.pairs = d; return plotPairs(d); });
}

async function plotPairs(d) {
  const values = d.values;
  const scale = colourScale(d.name, values);
  const heads = values.map((_, i) => i);
  const trace = {
    type: "heatmap", x: heads, y: heads, z: scale.z, customdata: values, text: values.map((row) => row.map(fmt)),
    hovertemplate: `head %{y} · head %{x}<br>${d.name} = %{text}<extra></extra>`, hoverongaps: false,
    ...scale.opts, colorbar: { thickness: 10, ...(scale.opts.colorbar || {}) },
  };
  const layout = baseLayout(`layer ${d.layer}, step ${d.step} (click: select the column's head)`, {
    xaxis: { title: { text: "head" }, constrain: "domain", dtick: heads.length > 24 ? 4 : 1 },
    yaxis: { title: { text: "head" }, autorange: "reversed", scaleanchor: "x", constrain: "domain", dtick: heads.length > 24 ? 4 : 1 },
    margin: { l: 44, r: 8, t: 28, b: 40 },
  });
  const div = document.getElementById("pairs");
  await Plotly.react(div, [trace], layout, PLOT_CONFIG);
  markPairs();
  document.body.dataset.pairsDrawn = `${d.name}/${d.layer}/${d.step}`;
  if (!div.dataset.bound) {
    div.dataset.bound = "1";
    div.on("plotly_click", (e) => select({ head: e.points[0].pointIndex[1] }));
  }
}

// Outline the selected head's row and name its nearest heads.
function markPairs() {
  const d = DATA.pairs;
  if (!d) return;
  const n = d.values.length;
  Plotly.relayout("pairs", { shapes: [{ type: "rect", x0: -0.5, x1: n - 0.5, y0: S.head - 0.5, y1: S.head + 0.5,
                                        line: { color: COLORS.mark, width: 2 }, xref: "x", yref: "y" }] });
  const row = d.values[S.head] || [];
  const higher = d.name === "qk_cosine";  // cosine: near = large; distances and divergences: near = small
  const others = row.map((v, h) => [h, v]).filter(([h, v]) => h !== S.head && v !== null)
    .sort((a, b) => (higher ? b[1] - a[1] : a[1] - b[1])).slice(0, 3);
  document.getElementById("neighbours").textContent =
    others.length ? "nearest: " + others.map(([h, v]) => `${h} (${short(v)})`).join(", ") : "";
}

// ---- start --------------------------------------------------------------------------------------

// The first call takes what `boot` fetched; later ones (another model, "reload steps") ask again.
async function start(first = false) {
  let request = null;
  try {
    if (first) {
      request = await boot;
    } else {
      META = await api("/api/meta", {});
    }
  } catch (err) {
    showError(err);
    return;
  }
  if (!Object.keys(META.models).length) {
    showError(new Error("the store holds no model"));
    return;
  }
  normalise();
  fillControls();
  writeURL();
  if (!model().steps.length) {
    showError(new Error(`model ${S.model} has no finished step yet; reload when a step is done`));
    return;
  }
  DATA.null = null;
  await Promise.all([drawOverview(request), loadNull().catch(showError)]);
  await Promise.all([drawHead(), drawTrajectory(), drawPairs()]);
}

// For tests and benchmarks: the state, the data drawn, and when the last head was drawn.
const APP = { S, DATA, get meta() { return META; }, select, drawnAt: null };
window.APP = APP;

document.addEventListener("DOMContentLoaded", () => {
  bindControls();
  start(true);
});
