// Persona console: reads the public API with the token entered once (kept in this tab's
// sessionStorage, never in a cookie or localStorage) and renders it. Plain DOM, no build
// step; every value from the API is set as text, never parsed as HTML.
"use strict";

const ROOT = document.body.dataset.root || "";
const TOKEN_KEY = "persona.token";
const SOURCE_COLOURS = {
  co: "#3b5bdb", topic: "#2b8a3e", embedding: "#e8590c", model: "#9c36b5",
  trending: "#1098ad", popular: "#868e96", hidden: "#c92a2a",
};
const SHARD_COLUMNS = [
  ["name", "shard"], ["state", "state"], ["partitions_owned", "partitions"],
  ["resident", "resident"], ["dirty", "dirty"], ["evicted", "evictions"],
  ["load_misses", "load misses"], ["last_seq", "journal"], ["checkpoint_seq", "checkpoint"],
];

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(value, digits = 3) {
  return typeof value === "number" ? Number(value.toFixed(digits)).toString() : String(value);
}

function when(ts) {
  return ts ? new Date(ts * 1000).toLocaleString() : "never";
}

// --- the token: entered once, kept only in this tab -----------------------------------
function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function showTokenState() {
  $("token-state").textContent = token() ? "token set for this tab" : "no token";
}

async function api(method, path) {
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const reply = await fetch(ROOT + path, { method, headers });
  let body = null;
  if (reply.status !== 204) {
    try { body = await reply.json(); } catch (_) { body = null; }
  }
  return { status: reply.status, ok: reply.ok, body };
}

function why(reply) {
  const error = reply.body && reply.body.error;
  const message = error ? `${error.code}: ${error.message}` : `HTTP ${reply.status}`;
  if (reply.status === 401) return `${message} (enter a token above)`;
  return message;
}

// --- one user ---------------------------------------------------------------------------
async function lookUp(userId) {
  const state = $("lookup-state");
  state.className = "";
  state.textContent = `loading ${userId}…`;
  const path = `/v1/users/${encodeURIComponent(userId)}`;
  const [profile, recs, nearest] = await Promise.all([
    api("GET", `${path}/profile`),
    api("GET", `${path}/recommendations?k=10`),
    api("GET", `${path}/nearest?k=8`),
  ]);
  const url = new URL(window.location.href);
  url.searchParams.set("user", userId);
  history.replaceState(null, "", url);
  if (!profile.ok && profile.status !== 404) {
    state.className = "error";
    state.textContent = why(profile);
    $("user").hidden = true;
    return;
  }
  $("user").hidden = false;
  $("delete-state").textContent = "";
  $("user-title").textContent = userId;
  renderProfile(profile.ok ? profile.body : null);
  renderRecommendations(recs);
  renderNearest(nearest);
  state.textContent = profile.ok ? "" : `no profile for ${userId} (recommendations are cold start)`;
  document.body.dataset.loaded = userId;
}

function renderProfile(profile) {
  const counters = $("counters");
  counters.replaceChildren();
  if (!profile) {
    $("user-facts").textContent = "no profile held";
    renderInterests([]);
    renderTimeline([]);
    return;
  }
  $("user-facts").textContent =
    `${profile.events} events · first seen ${when(profile.first_seen)} · ` +
    `last seen ${when(profile.last_seen)} · version ${profile.version}` +
    (profile.hidden_items.length ? ` · ${profile.hidden_items.length} hidden items` : "");
  for (const [action, count] of Object.entries(profile.counters)) {
    counters.append(el("div", {}, el("dt", { text: action }), el("dd", { text: String(count) })));
  }
  renderInterests(profile.interests);
  renderTimeline(profile.recent_actions);
}

// Positive interests as bars; topics with a negative score (hides outweigh the rest) are
// dislikes, listed apart rather than drawn as short bars.
function renderInterests(interests) {
  const liked = interests.filter((i) => i.score > 0).slice(0, 12);
  const disliked = interests.filter((i) => i.score < 0);
  const chart = $("interest-chart");
  chart.replaceChildren();
  if (!liked.length) {
    chart.append(el("p", { class: "note", text: "no positive interests yet" }));
  } else {
    const row = 22, label = 120, width = 460, top = liked[0].score;
    const plot = svg("svg", {
      viewBox: `0 0 ${width} ${row * liked.length}`, role: "img",
      "aria-label": "top interests by score",
    });
    liked.forEach((interest, n) => {
      const y = n * row;
      const length = Math.max(2, ((width - label - 60) * interest.score) / top);
      plot.append(svg("text", { x: 0, y: y + 15 }, interest.topic));
      const bar = svg("rect", {
        class: "bar", x: label, y: y + 4, width: length, height: row - 8, rx: 2,
        "data-topic": interest.topic,
      });
      bar.append(svg("title", {}, `${interest.topic}: ${fmt(interest.score)}`));
      plot.append(bar);
      plot.append(svg("text", { class: "value", x: label + length + 6, y: y + 15 }, fmt(interest.score, 2)));
    });
    chart.append(plot);
  }
  $("disliked-box").hidden = !disliked.length;
  $("disliked").replaceChildren(
    ...disliked.map((i) => el("li", { text: `${i.topic} (${fmt(i.score, 2)})` })),
  );
}

function renderTimeline(actions) {
  const list = $("timeline");
  list.replaceChildren();
  if (!actions.length) list.append(el("li", { class: "note", text: "no actions" }));
  for (const action of actions.slice(0, 50)) {
    list.append(el("li", { class: `entry action-${action.action}` },
      el("time", { text: when(action.ts) }),
      el("span", { class: "action", text: action.action }),
      el("span", { text: action.item_id })));
  }
  if (actions.length > 50) list.append(el("li", { class: "note", text: `and ${actions.length - 50} more` }));
}

function renderRecommendations(reply) {
  const body = $("recs").querySelector("tbody");
  body.replaceChildren();
  $("source-legend").replaceChildren(...Object.entries(SOURCE_COLOURS).map(([name, colour]) => {
    const key = el("i");
    key.style.background = colour;
    return el("span", {}, key, name);
  }));
  if (!reply.ok) {
    $("recs-meta").textContent = why(reply);
    return;
  }
  const recs = reply.body;
  $("recs-meta").textContent =
    (recs.experiment ? `experiment ${recs.experiment} · ` : "") +
    `variant ${recs.variant ?? "none"} · model ${recs.model || "none"}` +
    (recs.cold_start ? " · cold start" : "");
  recs.items.forEach((item, n) => {
    const parts = Object.entries(item.sources || {});
    const positive = parts.filter(([, v]) => v > 0);
    const sum = positive.reduce((total, [, v]) => total + v, 0) || 1;
    const stack = el("div", { class: "stack" });
    for (const [name, value] of positive) {
      const part = el("span", { title: `${name} +${fmt(value)}` });
      part.style.width = `${(100 * value) / sum}%`;
      part.style.background = SOURCE_COLOURS[name] || "#adb5bd";
      stack.append(part);
    }
    const text = parts.map(([name, v]) => `${name} ${v > 0 ? "+" : ""}${fmt(v)}`).join(" · ");
    body.append(el("tr", { class: "rec" },
      el("td", { class: "num", text: String(n + 1) }),
      el("td", { class: "item", text: item.item_id }),
      el("td", { class: "num", text: fmt(item.score) }),
      el("td", {}, stack, el("div", { class: "parts", text: text || "—" })),
      el("td", { text: item.reason })));
  });
}

function renderNearest(reply) {
  for (const [key, id] of [["embedding", "nearest-embedding"], ["model_items", "nearest-model"]]) {
    const list = $(id);
    list.replaceChildren();
    const items = reply.ok ? reply.body[key] : [];
    if (!items.length) {
      list.append(el("li", { class: "note", text: reply.ok ? "no vector for this user here" : why(reply) }));
    }
    for (const item of items) {
      list.append(el("li", {},
        el("span", { text: item.item_id }),
        el("span", { class: "sim", text: fmt(item.similarity) }),
        el("span", { class: "topics", text: item.topics.join(", ") })));
    }
  }
  $("nearest-meta").textContent = reply.ok ? `model ${reply.body.model || "none published"}` : "";
}

async function deleteUser() {
  const userId = $("user-title").textContent;
  if (!userId) return;
  const ok = window.confirm(
    `Delete every profile datum held for ${userId}? This cannot be undone (needs an admin token).`);
  if (!ok) return;
  const reply = await api("DELETE", `/v1/users/${encodeURIComponent(userId)}`);
  const state = $("delete-state");
  state.className = reply.status === 204 ? "" : "error";
  state.textContent = reply.status === 204 ? `${userId} deleted` : why(reply);
}

// --- experiments: GET /v1/experiments when the server has it ------------------------------
function interval(value) {
  // [low, high], or an object naming its bounds.
  if (Array.isArray(value) && value.length === 2 && value.every((v) => typeof v === "number")) return value;
  if (value && typeof value === "object") {
    const low = value.low ?? value.lower ?? value.lo, high = value.high ?? value.upper ?? value.hi;
    if (typeof low === "number" && typeof high === "number") return [low, high];
  }
  return null;
}

// A metric as the experiments endpoint gives it: a number, [low, high], or an object with
// an estimate (mean, estimate or value) and an interval (ci95, ci or interval).
function estimate(value) {
  if (typeof value === "number") return { estimate: value, bounds: null };
  if (!value || typeof value !== "object" || Array.isArray(value)) return null;
  const name = ["mean", "estimate", "value"].find((key) => key in value);
  if (name === undefined) return null;
  const point = value[name];
  return { estimate: point, bounds: interval(value.ci95 ?? value.ci ?? value.interval) };
}

function cell(value) {
  const bounds = interval(value);
  if (bounds) return `[${fmt(bounds[0])}, ${fmt(bounds[1])}]`;
  const metric = value && typeof value === "object" ? estimate(value) : null;
  if (metric) {
    if (metric.estimate === null) return "—";
    return fmt(metric.estimate) + (metric.bounds ? ` [${fmt(metric.bounds[0])}, ${fmt(metric.bounds[1])}]` : "");
  }
  if (value && typeof value === "object") return JSON.stringify(value);
  return value === null || value === undefined ? "" : fmt(value);
}

function table(rows, columns) {
  const head = el("tr", {}, ...columns.map(([, label]) => el("th", { text: label })));
  const lines = rows.map((row) => el("tr", {}, ...columns.map(([key]) => el("td", { text: cell(row[key]) }))));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...lines));
}

function variantRows(result) {
  const variants = result.variants ?? result.results ?? result;
  if (Array.isArray(variants)) return variants.filter((v) => v && typeof v === "object");
  if (variants && typeof variants === "object") {
    return Object.entries(variants)
      .filter(([, v]) => v && typeof v === "object" && !Array.isArray(v))
      .map(([name, v]) => ({ variant: name, ...v }));
  }
  return [];
}

// The first metric that carries an interval, one point and whisker per variant.
function intervalPlot(rows) {
  const measured = (row, key) => {
    const metric = estimate(row[key]);
    if (metric && metric.bounds && typeof metric.estimate === "number") return metric;
    const bounds = interval(row[key]);
    return bounds ? { estimate: (bounds[0] + bounds[1]) / 2, bounds } : null;
  };
  const keys = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  const key = keys.find((k) => rows.some((row) => measured(row, k)));
  if (!key) return null;
  const points = rows
    .map((row) => ({ name: String(row.variant ?? row.name ?? ""), metric: measured(row, key) }))
    .filter((p) => p.metric)
    .map((p) => ({ name: p.name, low: p.metric.bounds[0], high: p.metric.bounds[1], estimate: p.metric.estimate }));
  const min = Math.min(...points.map((p) => p.low)), max = Math.max(...points.map((p) => p.high));
  const span = max - min || 1, row = 28, left = 110, width = 420;
  const x = (v) => left + ((v - min) / span) * (width - left - 20);
  const plot = svg("svg", { viewBox: `0 0 ${width} ${row * points.length + 20}`, role: "img" });
  points.forEach((p, n) => {
    const y = n * row + 14;
    plot.append(svg("text", { x: 0, y: y + 4 }, p.name));
    plot.append(svg("line", { class: "ci", x1: x(p.low), x2: x(p.high), y1: y, y2: y }));
    plot.append(svg("circle", { cx: x(p.estimate), cy: y, r: 4 }));
  });
  plot.append(svg("text", { x: left, y: row * points.length + 16 }, `${key} with its interval: ${fmt(min)} … ${fmt(max)}`));
  return el("div", { class: "plot" }, plot);
}

async function showExperiment(name, box) {
  const reply = await api("GET", `/v1/experiments/${encodeURIComponent(name)}`);
  box.replaceChildren(el("h4", { text: name }));
  if (!reply.ok) {
    box.append(el("p", { class: "error", text: why(reply) }));
    return;
  }
  const rows = variantRows(reply.body);
  if (rows.length) {
    const keys = [...new Set(rows.flatMap((r) => Object.keys(r)))];
    box.append(table(rows, keys.map((k) => [k, k])));
    const plot = intervalPlot(rows);
    if (plot) box.append(plot);
  }
  box.append(el("details", {}, el("summary", { text: "as JSON" }),
    el("pre", { text: JSON.stringify(reply.body, null, 2) })));
}

function experimentNames(body) {
  const list = body && (body.experiments ?? body);
  if (Array.isArray(list)) return list.map((e) => (typeof e === "string" ? e : e.name)).filter(Boolean);
  if (list && typeof list === "object") return Object.keys(list);
  return [];
}

async function loadExperiments() {
  const box = $("experiments");
  const reply = await api("GET", "/v1/experiments");
  box.replaceChildren();
  if (reply.status === 404) {
    box.append(el("p", { class: "note", text: "This server has no experiment results (GET /v1/experiments is not there)." }));
    return;
  }
  if (!reply.ok) {
    box.append(el("p", { class: "error", text: why(reply) }));
    return;
  }
  const names = experimentNames(reply.body);
  if (!names.length) box.append(el("p", { class: "note", text: "no experiments" }));
  const detail = el("div");
  const buttons = el("p", {}, ...names.map((name) => {
    const button = el("button", { type: "button", class: "quiet", text: name });
    button.addEventListener("click", () => showExperiment(name, detail));
    return button;
  }));
  box.append(buttons, detail);
  if (names.length) showExperiment(names[0], detail);
}

// --- shards: what `persona status` shows ---------------------------------------------------
function seconds(value) {
  if (typeof value !== "number") return "?";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 120) return `${fmt(value, 1)} s`;
  if (value < 7200) return `${fmt(value / 60, 1)} min`;
  if (value < 172800) return `${fmt(value / 3600, 1)} h`;
  return `${fmt(value / 86400, 1)} d`;
}

// Freshness as the shards report it: for each clock (event time, arrival), p50 and p99.
function freshness(value) {
  if (!value || typeof value !== "object") return "";
  return Object.entries(value)
    .filter(([, v]) => v && typeof v === "object" && ("p50_s" in v || "p99_s" in v))
    .map(([clock, v]) => `${clock}: p50 ${seconds(v.p50_s)}, p99 ${seconds(v.p99_s)}`)
    .join(" · ");
}

async function loadShards() {
  const box = $("shards");
  const reply = await api("GET", "/v1/shards");
  box.replaceChildren();
  if (!reply.ok) {
    box.append(el("p", { class: "error", text: why(reply) }));
    return;
  }
  const shown = new Set([...SHARD_COLUMNS.map(([key]) => key), "freshness"]);
  const rows = reply.body.shards.map((shard) => {
    const more = Object.entries(shard)
      .filter(([key, value]) => !shown.has(key) && (typeof value !== "object" || value === null
        || (Array.isArray(value) && value.length)))
      .map(([key, value]) => `${key} ${Array.isArray(value) ? value.length : cell(value)}`);
    return {
      ...shard,
      behind: (shard.last_seq ?? 0) - (shard.checkpoint_seq ?? 0),
      fresh: freshness(shard.freshness),
      more: more.join(" · "),
    };
  });
  const columns = [
    ...SHARD_COLUMNS, ["behind", "not checkpointed"], ["fresh", "freshness"], ["more", "more"],
  ];
  const rendered = table(rows, columns);
  rendered.id = "shard-table";
  rendered.querySelectorAll("tbody tr").forEach((line, n) => {
    line.children[1].className = rows[n].state === "ok" ? "ok" : "down";
    line.lastChild.className = "parts";
  });
  box.append(rendered);
}

// --- wiring -------------------------------------------------------------------------------
function start() {
  showTokenState();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    showTokenState();
    loadShards();
    loadExperiments();
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
  });
  $("lookup").addEventListener("submit", (event) => {
    event.preventDefault();
    lookUp($("user-id").value.trim());
  });
  $("delete-user").addEventListener("click", deleteUser);
  $("shards-refresh").addEventListener("click", loadShards);
  const user = new URL(window.location.href).searchParams.get("user");
  if (user) {
    $("user-id").value = user;
    lookUp(user);
  }
  loadShards();
  loadExperiments();
}

start();
