// The rtmanager console: plain JavaScript, no build step, nothing fetched from elsewhere.
// Data comes from the REST API with the operator's token (sessionStorage, Bearer header); live
// changes from the watch API (GET /api/v1/events), read with fetch() and a stream reader so that the
// token travels in the Authorization header and never in a URL.
"use strict";

const TOKEN_KEY = "rtmanager-token";
const PAGE = 1000;            // games per GET /api/v1/runtimes page
const LIST_ROWS = 500;        // rows of the games list drawn at once
const RECENT_CRASH = 10 * 60; // seconds: a crash this recent puts a game in trouble
const ACTIONS = [             // path under /api/v1/runtimes/{id}/, label, asks for an image
  ["restart", "restart", false], ["patch", "patch", true], ["pause", "pause", false],
  ["resume", "resume", false], ["force-next-turn", "force a turn", false], ["stop", "stop", false],
];
const UP = new Set(["starting", "running", "generation_in_progress", "generation_failed", "engine_unreachable"]);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  me: null,                 // GET /api/v1/whoami
  games: new Map(),         // game_id -> record
  loaded: false,
  changes: { rollouts: [], drains: [] },
  position: null,           // the last watch event id seen
  stream: null,             // AbortController of the watch stream
  refetch: new Set(),       // games whose record is read again after a snapshot
  drawPending: false,
  snapshots: new Map(),     // game_id -> its last snapshots seen on this page
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fill(tbody, rows) { tbody.replaceChildren(...rows); }

function showError(message) { $("error").textContent = message || ""; }

class Unauthorized extends Error {}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + state.token };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                                   cache: "no-store" });
  if (resp.status === 401) throw new Unauthorized("the token was refused");
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  return { status: resp.status, data };
}

async function get(path) {
  const { status, data } = await api("GET", path);
  if (status !== 200) throw new Error(`${path}: ${status} ${data && data.error ? data.error : ""}`);
  return data;
}

// ------------------------------------------------------------------ sign in
function signedOut(message) {
  if (state.stream) state.stream.abort();
  state.stream = null;
  state.token = null;
  state.me = null;
  sessionStorage.removeItem(TOKEN_KEY);
  for (const id of ["fleet", "games", "game"]) $(id).hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("login-error").textContent = message || "";
  setLive(false);
}

async function signIn(token) {
  state.token = token;
  try {
    state.me = await get("/api/v1/whoami");
  } catch (e) {
    signedOut(e instanceof Unauthorized ? "that token was refused" : String(e.message || e));
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("login").hidden = true;
  $("logout").hidden = false;
  $("who").textContent = `${state.me.name} (${state.me.role})`;
  $("who").dataset.role = state.me.role;
  startWatch();
  route();
}

function may(method, path) {
  return !!state.me && state.me.allowed.some((a) => a.method === method && a.path === path);
}

// ------------------------------------------------------------------ data
async function loadGames() {
  const games = new Map();
  let cursor = null;
  do {
    const q = new URLSearchParams({ limit: String(PAGE) });
    if (cursor) q.set("cursor", cursor);
    const page = await get("/api/v1/runtimes?" + q);
    for (const r of page.runtimes) games.set(r.game_id, r);
    cursor = page.next;
  } while (cursor);
  // A snapshot seen while the list was read is newer than the list's copy when its revision is.
  for (const [id, r] of state.games) {
    const listed = games.get(id);
    if (listed && (r.snapshot_revision || 0) > (listed.snapshot_revision || 0)) games.set(id, r);
  }
  state.games = games;
  state.loaded = true;
}

async function loadChanges() {
  const changes = { rollouts: [], drains: [] };
  try {
    const rollouts = (await get("/api/v1/rollouts")).rollouts || [];
    for (const r of rollouts.filter((r) => r.state === "running" || r.state === "paused")) {
      changes.rollouts.push(await get(`/api/v1/rollouts/${r.id}`));
    }
  } catch (e) { if (e instanceof Unauthorized) throw e; }
  try {
    const drains = (await get("/api/v1/drains")).drains || [];
    for (const d of drains.filter((d) => d.status !== "undrained")) {
      changes.drains.push(await get(`/api/v1/drains/${d.id}`));
    }
  } catch (e) { if (e instanceof Unauthorized) throw e; }
  state.changes = changes;
}

// A snapshot from the watch API: applied at once to the game's copy, whose full record is read again
// shortly after (a snapshot carries the status, not the crash count or the clock).
function applySnapshot(s) {
  const id = s.game_id;
  const prev = state.games.get(id);
  const revision = Number(s.revision || 0);
  const shots = state.snapshots.get(id) || [];
  shots.unshift(s);
  state.snapshots.set(id, shots.slice(0, 20));
  if (prev && (prev.snapshot_revision || 0) >= revision) return;
  const r = Object.assign({}, prev || { game_id: id, crash_count: 0, node_id: null, turn_interval: 0 });
  r.status = s.status;
  r.desired_status = s.desired_status;
  r.engine_version = s.engine_version;
  r.current_image_ref = s.image_ref || r.current_image_ref;
  r.turn = s.turn === "" ? null : Number(s.turn);
  r.paused = s.paused === "1";
  r.snapshot_revision = revision;
  r.last_reason = s.reason;
  if (s.error_code) { r.last_error_code = s.error_code; r.last_error_message = s.error_message; }
  if (s.reason === "crashed" || s.reason === "crash_loop") {
    r.crash_count = (r.crash_count || 0) + 1;
    r.last_crash_at = s.observed_at;
    r.last_exit_code = s.exit_code === "" ? null : Number(s.exit_code);
  }
  if (s.status === "removed") state.games.delete(id); else state.games.set(id, r);
  state.refetch.add(id);
  draw();
}

let refetchTimer = null;
function scheduleRefetch() {
  if (refetchTimer) return;
  refetchTimer = setTimeout(async () => {
    refetchTimer = null;
    const ids = [...state.refetch].slice(0, 50);
    for (const id of ids) state.refetch.delete(id);
    for (const id of ids) {
      try {
        const { status, data } = await api("GET", `/api/v1/runtimes/${encodeURIComponent(id)}`);
        const have = state.games.get(id);
        if (status === 200 && (!have || (data.snapshot_revision || 0) >= (have.snapshot_revision || 0))) {
          state.games.set(id, Object.assign(data, { last_reason: have && have.last_reason }));
        } else if (status === 404) state.games.delete(id);
      } catch (e) { if (e instanceof Unauthorized) { signedOut("the token was refused"); return; } }
    }
    draw();
    if (state.refetch.size) scheduleRefetch();
  }, 300);
}

// ------------------------------------------------------------------ the watch stream
function setLive(on) {
  $("live").className = on ? "on" : "off";
  $("live").textContent = on ? "live" : "offline";
}

function startWatch() {
  if (state.stream) state.stream.abort();
  const ctl = new AbortController();
  state.stream = ctl;
  (async () => {
    let delay = 500;
    while (!ctl.signal.aborted) {
      try {
        const q = state.position === null ? "" : "?since=" + state.position;
        const resp = await fetch("/api/v1/events" + q, {
          headers: { Authorization: "Bearer " + state.token, Accept: "text/event-stream" },
          signal: ctl.signal, cache: "no-store",
        });
        if (resp.status === 401) { signedOut("the token was refused"); return; }
        if (resp.status !== 200) throw new Error("watch: " + resp.status);
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            await onEvent(block);
            delay = 500;
          }
        }
      } catch (e) {
        if (ctl.signal.aborted) return;
      }
      setLive(false);
      await new Promise((ok) => setTimeout(ok, delay));
      delay = Math.min(delay * 2, 10000);
    }
  })();
}

async function onEvent(block) {
  let id = null, event = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const name = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (name === "id") id = Number(value);
    else if (name === "event") event = value;
    else if (name === "data") data += value;
  }
  if (id !== null) state.position = id;
  if (event === "ready") {
    setLive(true);
    if (!state.loaded) { await refresh(); }
  } else if (event === "snapshot") {
    applySnapshot(JSON.parse(data));
    scheduleRefetch();
  } else if (event === "reset") {
    await refresh();  // what lay between is gone: read the fleet again
  }
}

async function refresh() {
  try {
    await loadGames();
    await loadChanges();
    showError("");
  } catch (e) {
    if (e instanceof Unauthorized) { signedOut("the token was refused"); return; }
    showError(String(e.message || e));
  }
  draw();
}

// ------------------------------------------------------------------ trouble
function age(iso) {
  if (!iso) return null;
  return (Date.now() - Date.parse(iso)) / 1000;
}

function since(iso) {
  const s = age(iso);
  if (s === null) return "";
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

// An ISO time as "2026-12-04 13:31:48" (UTC, as the API gives it; the full value is the cell's title).
function when(iso) { return iso ? String(iso).slice(0, 19).replace("T", " ") : ""; }

function plural(n, one, many) { return `${n} ${n === 1 ? one : many}`; }

// Why a game needs a look, or null: the order is the order of the trouble list.
function trouble(r) {
  if (r.status === "removed") return null;
  if (r.last_reason === "crash_loop" || (r.crash_count >= 3 && age(r.last_crash_at) !== null &&
      age(r.last_crash_at) < RECENT_CRASH)) {
    return { rank: 0, why: `crash loop (${plural(r.crash_count, "crash", "crashes")}, exit ${r.last_exit_code ?? "?"})`,
             at: r.last_crash_at };
  }
  if (r.status === "engine_unreachable") return { rank: 1, why: "engine unreachable", at: r.unreachable_since };
  if (r.status === "node_lost") return { rank: 1, why: "node lost", at: r.node_lost_since };
  if (r.status === "generation_failed") {
    return { rank: 2, why: "generation failed" + (r.last_error_message ? ": " + r.last_error_message : ""),
             at: r.last_op_at };
  }
  if (r.status === "running" && !r.paused && r.turn_interval > 0) {
    const from = [r.last_turn_at, r.clock_from].filter(Boolean).map(Date.parse);
    if (from.length) {
      const late = (Date.now() - Math.max(...from)) / 1000 - r.turn_interval;
      if (late > r.turn_interval) return { rank: 3, why: `turn late by ${Math.round(late)} s`, at: r.last_turn_at };
    }
  }
  if (r.desired_status === "running" && r.status === "stopped" && r.last_error_code) {
    return { rank: 4, why: `not running: ${r.last_error_code}`, at: r.last_op_at };
  }
  if (r.crash_count > 0 && age(r.last_crash_at) !== null && age(r.last_crash_at) < RECENT_CRASH) {
    return { rank: 5, why: `crashed (exit ${r.last_exit_code ?? "?"})`, at: r.last_crash_at };
  }
  return null;
}

// ------------------------------------------------------------------ drawing
function draw() {
  if (state.drawPending) return;
  state.drawPending = true;
  setTimeout(() => { state.drawPending = false; route(true); }, 100);
}

function gameLink(id) { return el("a", { href: "#game/" + encodeURIComponent(id) }, id); }

function counted(key) {
  const counts = new Map();
  for (const r of state.games.values()) {
    const k = key(r);
    counts.set(k, (counts.get(k) || 0) + 1);
  }
  return [...counts.entries()].sort((a, b) => b[1] - a[1] || String(a[0]).localeCompare(String(b[0])));
}

function countRows(entries, total) {
  return entries.map(([k, n]) => el("tr", { "data-key": k },
    el("td", {}, k), el("td", { class: "n" }, n),
    el("td", {}, bar(n, total))));
}

function bar(n, total) {
  const span = el("span", { class: "bar" });
  span.style.width = Math.max(2, Math.round(160 * n / Math.max(total, 1))) + "px";
  return span;
}

function drawFleet() {
  const games = [...state.games.values()];
  $("total").textContent = `${games.length} games`;
  $("total").dataset.total = String(games.length);
  const bad = new Set(["engine_unreachable", "generation_failed", "node_lost"]);
  $("by-status").replaceChildren(...counted((r) => r.status).map(([s, n]) =>
    el("div", { class: "card" + (bad.has(s) ? " bad" : ""), "data-status": s },
      el("span", { class: "n" }, n), s)));
  fill($("by-version").tBodies[0], countRows(counted((r) => r.engine_version || "(unregistered)"), games.length));
  fill($("by-node").tBodies[0], countRows(counted((r) => r.node_id || "(this host)"), games.length));
  const troubled = games.map((r) => [r, trouble(r)]).filter(([, t]) => t)
    .sort((a, b) => a[1].rank - b[1].rank || a[0].game_id.localeCompare(b[0].game_id));
  $("trouble-count").textContent = troubled.length ? `${troubled.length}` : "";
  $("no-trouble").hidden = troubled.length > 0;
  $("trouble").hidden = troubled.length === 0;
  fill($("trouble").tBodies[0], troubled.slice(0, 200).map(([r, t]) =>
    el("tr", { class: "bad", "data-game": r.game_id },
      el("td", {}, gameLink(r.game_id)), el("td", {}, r.status), el("td", {}, t.why), el("td", {}, since(t.at)))));
  drawChanges();
}

function drawChanges() {
  const blocks = [];
  for (const r of state.changes.rollouts) {
    blocks.push(el("div", { class: "change", "data-rollout": r.id },
      el("strong", {}, `rollout ${r.id}`), ` ${r.state}: ${r.source_version || "any version"} → ${r.target_version} `,
      el("span", { class: "quiet" }, Object.entries(r.games_by_state || {}).map(([k, n]) => `${k} ${n}`).join(", ")),
      perGame(r.games)));
  }
  for (const d of state.changes.drains) {
    blocks.push(el("div", { class: "change", "data-drain": d.id },
      el("strong", {}, `drain ${d.id}`), ` ${d.status}: ${d.node || d.target || ""} `,
      el("span", { class: "quiet" }, Object.entries(d.counts || d.games_by_state || {})
        .map(([k, n]) => `${k} ${n}`).join(", ")),
      perGame(d.games)));
  }
  $("changes").replaceChildren(...blocks);
  $("no-changes").hidden = blocks.length > 0;
}

const SETTLED = new Set(["done", "skipped", "restored", "rolled_back"]);
const PER_CHANGE = 12;  // games drawn per rollout or drain: the ones moving first

function perGame(games) {
  if (!Array.isArray(games) || games.length === 0) return null;
  const rank = (g) => (SETTLED.has(g.state) ? 2 : g.state === "waiting" ? 1 : 0);
  const shown = [...games].sort((a, b) => rank(a) - rank(b)).slice(0, PER_CHANGE);
  const more = games.length - shown.length;
  return el("table", {}, el("tbody", {}, shown.map((g) => el("tr", {},
    el("td", {}, gameLink(g.game_id)), el("td", { "data-state": g.state || "" }, g.state || ""),
    el("td", {}, [g.canary ? "canary" : "", g.action || ""].filter(Boolean).join(" ")),
    el("td", { class: "quiet" }, g.reason || ""))),
    more > 0 ? el("tr", {}, el("td", { colspan: 4, class: "quiet" }, `and ${more} more`)) : null));
}

function drawList() {
  const words = $("filter").value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  const games = [...state.games.values()].filter((r) => {
    const text = [r.game_id, r.status, r.engine_version, r.node_id].join(" ").toLowerCase();
    return words.every((w) => text.includes(w));
  }).sort((a, b) => a.game_id.localeCompare(b.game_id));
  fill($("game-list").tBodies[0], games.slice(0, LIST_ROWS).map((r) => el("tr", { "data-game": r.game_id },
    el("td", {}, gameLink(r.game_id)), el("td", {}, r.status), el("td", {}, r.engine_version || ""),
    el("td", {}, r.node_id || ""), el("td", {}, r.turn ?? ""), el("td", {}, r.crash_count || ""))));
  $("game-list-more").textContent = games.length > LIST_ROWS ? `${games.length - LIST_ROWS} more: filter` : "";
}

const RECORD_FIELDS = ["status", "desired_status", "engine_version", "current_image_ref", "desired_image_ref",
  "node_id", "health", "turn", "phase", "paused", "turn_interval", "last_turn_at", "crash_count", "last_exit_code",
  "last_oom_killed", "last_crash_at", "last_error_code", "last_error_message", "stop_reason", "started_at",
  "stopped_at", "generation", "observed_generation", "snapshot_revision", "state_bytes", "last_op_at",
  "created_at"];

let gameShown = null;
async function showGame(id, redraw) {
  $("game-id").textContent = id;
  const r = state.games.get(id);
  if (!redraw || gameShown !== id) {
    gameShown = id;
    drawActions(id);
    $("action-result").textContent = "";
    fill($("record").tBodies[0], []);
    fill($("operations").tBodies[0], []);
    fill($("snapshots").tBodies[0], []);
    $("log-tail").textContent = "";
    loadGame(id);
    return;
  }
  if (r) $("game-status").textContent = r.status;
  drawSnapshots(id);
}

async function loadGame(id) {
  const path = `/api/v1/runtimes/${encodeURIComponent(id)}`;
  try {
    const [rec, ops] = await Promise.all([api("GET", path), api("GET", path + "/operations")]);
    if (gameShown !== id) return;
    if (rec.status !== 200) { showError(`game ${id}: ${rec.data && rec.data.error}`); return; }
    const have = state.games.get(id);
    state.games.set(id, Object.assign(rec.data, { last_reason: have && have.last_reason }));
    $("game-status").textContent = rec.data.status;
    fill($("record").tBodies[0], RECORD_FIELDS.filter((k) => k in rec.data).map((k) =>
      el("tr", {}, el("th", {}, k), el("td", { "data-field": k }, String(rec.data[k] ?? "")))));
    const operations = (ops.data && ops.data.operations) || [];
    fill($("operations").tBodies[0], operations.slice(0, 20).map((o) =>
      el("tr", {}, el("td", { title: o.finished_at || o.created_at || "" }, when(o.finished_at || o.created_at)),
        el("td", {}, o.op),
        el("td", {}, o.status || ""), el("td", {}, o.actor || o.source || ""),
        el("td", {}, o.error_message || o.error_code || ""))));
    // The last lines of output rtmanager kept: those of the newest crash in the operation log.
    const crash = operations.find((o) => o.params && o.params.log_tail);
    $("log-tail").textContent = crash ? crash.params.log_tail : "(none kept)";
    $("log-when").textContent = crash ? `(the crash of ${crash.created_at})` : "";
    await loadSnapshots(id);
  } catch (e) {
    if (e instanceof Unauthorized) signedOut("the token was refused"); else showError(String(e.message || e));
  }
}

// One game's snapshots among the fleet's last HISTORY: one follow=0 read of the watch API, bounded so
// that a game page never makes the server scan all that retention kept.
const HISTORY = 20000;
async function loadSnapshots(id) {
  const since = Math.max(0, (state.position || 0) - HISTORY);
  const resp = await fetch(`/api/v1/events?since=${since}&follow=0&game_id=${encodeURIComponent(id)}`,
    { headers: { Authorization: "Bearer " + state.token }, cache: "no-store" });
  if (resp.status !== 200) return;
  const text = await resp.text();
  const shots = [];
  for (const block of text.split("\n\n")) {
    let event = "", data = "", eid = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event: ")) event = line.slice(7);
      else if (line.startsWith("data: ")) data = line.slice(6);
      else if (line.startsWith("id: ")) eid = line.slice(4);
    }
    if (event === "snapshot") shots.unshift(Object.assign(JSON.parse(data), { position: eid }));
  }
  const seen = new Set(shots.map((s) => s.snapshot_id));
  const live = (state.snapshots.get(id) || []).filter((s) => !seen.has(s.snapshot_id));
  state.snapshots.set(id, live.concat(shots).slice(0, 20));
  drawSnapshots(id);
}

function drawSnapshots(id) {
  fill($("snapshots").tBodies[0], (state.snapshots.get(id) || []).slice(0, 10).map((s) => el("tr", {},
    el("td", {}, s.revision), el("td", { title: s.observed_at }, when(s.observed_at)), el("td", {}, s.status), el("td", {}, s.reason),
    el("td", {}, s.turn))));
}

function drawActions(id) {
  const box = $("actions");
  const buttons = ACTIONS.filter(([path]) => may("POST", "/api/v1/runtimes/{game_id}/" + path)).map(([path, label, image]) =>
    el("button", { type: "button", id: "action-" + path, "data-action": path,
                   class: path === "stop" ? "danger" : "", onclick: () => act(id, path, label, image) }, label));
  box.replaceChildren(...buttons);
  box.hidden = buttons.length === 0;
}

async function act(id, path, label, image) {
  let body = {};
  if (image) {
    const r = state.games.get(id);
    const ref = window.prompt(`${label} game ${id} to which image?`, (r && r.current_image_ref) || "");
    if (!ref) return;
    body = { image_ref: ref };
  }
  if (!window.confirm(`${label} game ${id}?`)) return;
  $("action-result").textContent = `${label}: sent…`;
  try {
    const { status, data } = await api("POST", `/api/v1/runtimes/${encodeURIComponent(id)}/${path}?wait=20`, body);
    const what = data && (data.outcome || data.error || data.status) || "";
    const why = data && data.error_message ? ": " + data.error_message : "";
    $("action-result").textContent = `${label}: ${status} ${what}${why}`;
    $("action-result").dataset.status = String(status);
  } catch (e) {
    if (e instanceof Unauthorized) signedOut("the token was refused");
    else $("action-result").textContent = `${label}: ${e.message || e}`;
  }
  if (gameShown === id) loadGame(id);
}

// ------------------------------------------------------------------ routing
function route(redraw) {
  if (!state.me) return;
  const hash = decodeURIComponent(location.hash.slice(1));
  const [view, ...rest] = hash.split("/");
  const name = view === "game" && rest.length ? "game" : view === "games" ? "games" : "fleet";
  for (const id of ["fleet", "games", "game"]) $(id).hidden = id !== name;
  if (name === "fleet") drawFleet();
  else if (name === "games") drawList();
  else showGame(rest.join("/"), redraw === true);
  document.body.dataset.view = name;
  document.body.dataset.loaded = state.loaded ? "1" : "0";
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin").addEventListener("click", () => signIn($("token").value.trim()));
  $("token").addEventListener("keydown", (e) => { if (e.key === "Enter") signIn($("token").value.trim()); });
  $("logout").addEventListener("click", () => signedOut(""));
  $("filter").addEventListener("input", () => drawList());
  window.addEventListener("hashchange", () => route(false));
  setInterval(() => { if (state.me && state.loaded) loadChanges().then(draw, () => {}); }, 10000);
  if (state.token) signIn(state.token); else signedOut("");
});
