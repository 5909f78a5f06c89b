# ruff: noqa: E501, RUF001  (an HTML document: its lines and dashes are the page's, not Python's)
"""The pool view's page: one self-contained HTML document (no assets, no CDN), served by
``flame_asgi.pool_view``. It opens ``ws`` next to itself (with the page's own query string,
for guards that read a token there) and redraws from each pushed snapshot; every text
from the server goes through ``textContent``, never ``innerHTML``.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>flame_asgi pools</title>
<link rel="icon" href="data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Cpath d='M8 1C9 5 13 6 13 10a5 5 0 0 1-10 0c0-2 1-3 2-4 0 2 1 3 2 3C7 6 6 4 8 1z' fill='%23e8590c'/%3E%3C/svg%3E">
<style>
:root { --bg:#f6f5f2; --card:#fff; --ink:#1d1d1f; --muted:#6b6b70; --line:#e3e1dc; --flame:#e8590c;
  --amber:#f59f00; --ok:#2f9e44; --bad:#c92a2a; --blue:#1971c2;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); background: var(--bg); }
body { margin: 0 auto; max-width: 1100px; padding: 1.2rem; }
header { display: flex; flex-wrap: wrap; gap: .4rem 1rem; align-items: baseline; justify-content: space-between; }
h1 { font-size: 1.45rem; margin: 0; }
.muted { color: var(--muted); }
#conn::before { content: ""; display: inline-block; width: .6em; height: .6em; border-radius: 50%;
  margin-right: .35em; background: var(--muted); }
#conn[data-state=live]::before { background: var(--ok); }
#conn[data-state=closed]::before { background: var(--bad); }
.pool { background: var(--card); border: 1px solid var(--line); border-radius: 12px; padding: 1rem 1.2rem;
  margin-top: 1rem; min-width: 0; }
.pool h2 { margin: 0 0 .6rem; font-size: 1.15rem; display: flex; flex-wrap: wrap; gap: .3rem .6rem; align-items: baseline; }
.tag { font-size: .75rem; font-weight: normal; padding: .1rem .5rem; border-radius: 99px; background: #ececea; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(120px, 1fr)); gap: .6rem; }
.tile { border: 1px solid var(--line); border-radius: 8px; padding: .45rem .6rem; }
.tile b { display: block; font-size: 1.3rem; font-variant-numeric: tabular-nums; }
.tile span { font-size: .78rem; color: var(--muted); }
svg.chart { width: 100%; height: 110px; margin-top: .8rem; display: block; }
.legend { font-size: .75rem; color: var(--muted); display: flex; gap: 1rem; flex-wrap: wrap; }
.legend i { display: inline-block; width: .8em; height: .8em; border-radius: 2px; margin-right: .3em; vertical-align: -1px; }
table { width: 100%; border-collapse: collapse; margin-top: .8rem; font-size: .86rem; }
th { text-align: left; font-weight: 600; color: var(--muted); font-size: .75rem; }
th, td { padding: .3rem .4rem; border-bottom: 1px solid var(--line); }
td.id { font-family: ui-monospace, monospace; overflow-wrap: anywhere; }
td.url { font-family: ui-monospace, monospace; font-size: .78rem; color: var(--muted); overflow-wrap: anywhere; }
.state { font-size: .75rem; padding: .1rem .5rem; border-radius: 99px; background: #ececea; white-space: nowrap; }
.state[data-state=busy] { background: #ffe8cc; color: #c2410c; }
.state[data-state=idle] { background: #d3f9d8; color: var(--ok); }
.state[data-state=warm] { background: #fff0f6; color: #a61e4d; }
.state[data-state=booting] { background: #fff3bf; color: #8f5c00; }
.state[data-state=stopping] { background: #e7f5ff; color: var(--blue); }
.slots { display: inline-block; width: 70px; height: .5rem; background: #ececea; border-radius: 4px; overflow: hidden;
  vertical-align: middle; margin-right: .4rem; }
.slots i { display: block; height: 100%; background: var(--flame); }
h3 { font-size: .9rem; margin: 1rem 0 .2rem; }
ol.failures { list-style: none; margin: 0; padding: 0; font-size: .84rem; }
ol.failures li { padding: .35rem 0; border-bottom: 1px solid var(--line); overflow-wrap: anywhere; }
ol.failures .what { color: var(--bad); font-weight: 600; }
ol.failures .detail { display: block; color: var(--muted); font-family: ui-monospace, monospace; font-size: .78rem; }
.empty { color: var(--muted); font-size: .84rem; margin: .3rem 0; }
</style>
</head>
<body>
<header>
  <h1>flame_asgi pools</h1>
  <span class="muted"><span id="conn" data-state="connecting">connecting…</span> · process <span id="pid">?</span></span>
</header>
<main id="pools"><p class="empty">Waiting for the first update…</p></main>
<script>
"use strict";
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else if (k.startsWith("data-")) node.dataset[k.slice(5)] = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
};
const ago = (seconds) => seconds < 1 ? "now" : seconds < 90 ? `${Math.round(seconds)} s` :
  seconds < 5400 ? `${Math.round(seconds / 60)} min` : `${(seconds / 3600).toFixed(1)} h`;
const secs = (s) => s == null ? "–" : s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;

function tile(value, label, key) { return el("div", { class: "tile", "data-key": key }, el("b", { text: value }), el("span", { text: label })); }

// The chart covers the last ten minutes, or less while this process is younger (from 1 min).
const chartSpan = (data) => Math.min(600, Math.max(60, data.now - data.since));

function chart(pool, now, span) {
  const NS = "http://www.w3.org/2000/svg", W = 600, H = 100;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("class", "chart"); svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const top = Math.max(pool.max, 1), x = (t) => W - (now - t) / span * W, y = (v) => H - 4 - v / top * (H - 10);
  const before = pool.history.filter((p) => now - p[0] > span).pop();  // the state as the window opens
  const pts = [...(before ? [[now - span, before[1], before[2], before[3]]] : []),
    ...pool.history.filter((p) => now - p[0] <= span)];
  const last = pts.length ? pts[pts.length - 1] : [now, 0, 0, 0];
  const series = [...pts, [now, last[1], last[2], last[3]]];
  const step = (value) => {
    let d = `M ${Math.max(0, x(series[0][0]))} ${y(value(series[0]))}`;
    for (let i = 1; i < series.length; i++) d += ` H ${Math.max(0, x(series[i][0]))} V ${y(value(series[i]))}`;
    return d;
  };
  const path = (d, attrs) => { const p = document.createElementNS(NS, "path"); p.setAttribute("d", d);
    for (const [k, v] of Object.entries(attrs)) p.setAttribute(k, v); svg.append(p); };
  path(`M 0 ${y(pool.max)} H ${W}`, { stroke: "#adb5bd", "stroke-dasharray": "4 4", fill: "none" });
  path(step((p) => p[1] + p[2]) + ` V ${H} H ${Math.max(0, x(series[0][0]))} Z`, { fill: "#ffe066", stroke: "none" });
  path(step((p) => p[1]) + ` V ${H} H ${Math.max(0, x(series[0][0]))} Z`, { fill: "#ffa94d", stroke: "none" });
  path(step((p) => p[1]), { fill: "none", stroke: "#e8590c", "stroke-width": 2, "vector-effect": "non-scaling-stroke" });
  path(step((p) => p[3]), { fill: "none", stroke: "#1971c2", "stroke-width": 1.5, "vector-effect": "non-scaling-stroke",
    "stroke-dasharray": "3 3" });
  return svg;
}

function runnersTable(pool, now) {
  if (!pool.runners.length) return el("p", { class: "empty", text: "No runners: scaled to zero." });
  const rows = pool.runners.map((r) => el("tr", { class: "runner", "data-runner": r.id ?? "", "data-state": r.state },
    el("td", { class: "id", text: r.id ?? "(booting)" }),
    el("td", {}, el("span", { class: "state", "data-state": r.state, text: r.state })),
    el("td", {}, el("span", { class: "slots" }, el("i", { style: `width:${100 * r.active / r.capacity}%` })),
      el("span", { text: `${r.active} / ${r.capacity}` })),
    el("td", { text: r.since == null ? "–" : (r.state === "booting" ? "booting for " : "up ") + ago(now - r.since) }),
    el("td", { text: secs(r.boot_time) }),
    el("td", { class: "url", text: r.url ?? "" })));
  return el("table", {}, el("thead", {}, el("tr", {}, ...["runner", "state", "slots", "since", "boot", "url"]
    .map((h) => el("th", { text: h })))), el("tbody", {}, ...rows));
}

function failures(pool, now) {
  if (!pool.failures.length) return el("p", { class: "empty", text: "No failures." });
  return el("ol", { class: "failures" }, ...pool.failures.map((f) => el("li", { class: "failure", "data-reason": f.reason },
    el("span", { class: "muted", text: `${ago(now - f.at)} ago · ` }), el("span", { class: "what", text: f.what }),
    el("span", { text: ` ${f.runner ?? ""} · ${f.reason}` }), el("span", { class: "detail", text: f.detail }))));
}

function render(data) {
  document.getElementById("pid").textContent = data.pid;
  const now = data.now, span = chartSpan(data);
  const sections = data.pools.map((pool) => el("section", { class: "pool", "data-pool": pool.name },
    el("h2", {}, el("span", { text: pool.name }), el("span", { class: "tag", text: pool.backend }),
      el("span", { class: "tag", text: `min ${pool.min} · max ${pool.max} · ${pool.capacity} slot(s) each` }),
      el("span", { class: "tag", text: pool.running ? "running" : "stopped" })),
    el("div", { class: "tiles" },
      tile(`${pool.runners.filter((r) => r.state !== "booting").length} / ${pool.max}`, "runners", "runners"),
      tile(String(pool.booting), "booting", "booting"),
      tile(`${pool.slots_used} / ${pool.slots}`, "slots in use", "slots"),
      tile(String(pool.waiting), "waiting callers", "waiting"),
      tile(pool.calls_per_second.toFixed(1), `calls/s (${pool.calls_total} done)`, "rate"),
      tile(secs(pool.boot_median), `median boot (${pool.boot_times.length})`, "boot"),
      tile(String(pool.failed_total), "failed calls", "failed")),
    chart(pool, now, span),
    el("div", { class: "legend" }, el("span", {}, el("i", { style: "background:#ffa94d" }), "runners"),
      el("span", {}, el("i", { style: "background:#ffe066" }), "booting"),
      el("span", {}, el("i", { style: "background:#1971c2" }), "waiting"),
      el("span", { text: `last ${span < 90 ? `${Math.round(span)} s` : `${Math.round(span / 60)} min`}; dashed: max (${pool.max})` })),
    el("h3", { text: "Runners" }), runnersTable(pool, now),
    el("h3", { text: "Recent failures" }), failures(pool, now)));
  if (!sections.length) sections.push(el("p", { class: "empty", text: "This app has no pools." }));
  document.getElementById("pools").replaceChildren(...sections);
}

function connect(delay = 500) {
  const url = new URL("ws" + location.search, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const conn = document.getElementById("conn");
  const ws = new WebSocket(url);
  ws.onopen = () => { conn.dataset.state = "live"; conn.textContent = "live"; delay = 500; };
  ws.onmessage = (message) => render(JSON.parse(message.data));
  ws.onclose = () => {
    conn.dataset.state = "closed";
    conn.textContent = `disconnected, retrying in ${Math.round(delay / 1000)} s…`;
    setTimeout(() => connect(Math.min(delay * 2, 10000)), delay);
  };
}
connect();
</script>
</body>
</html>
"""
