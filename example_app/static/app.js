// The page: start a job, follow it live over a WebSocket, list past jobs from the database.
// A job runs on the server whether or not a page follows it: the page keeps the job it
// follows in its address (#job=<id>), so a reload attaches again and replays it so far.
"use strict";

const $ = (id) => document.getElementById(id);
const wsURL = (path) => `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}`;

function thumbnailFigure(t, caption) {
  const figure = document.createElement("figure");
  figure.className = "thumb";
  figure.dataset.index = t.index;
  const img = document.createElement("img");
  img.src = t.url;
  img.width = t.width;
  img.height = t.height;
  img.alt = `frame at ${t.timestamp.toFixed(1)} s`;
  const text = document.createElement("figcaption");
  text.textContent = caption;
  figure.append(img, text);
  return figure;
}

function describe(t) {
  return `#${t.index + 1} · ${t.timestamp.toFixed(1)} s · ${(t.size / 1024).toFixed(1)} kB`;
}

// FastAPI's error bodies: {"detail": "text"} or {"detail": [{"msg": ...}, ...]} (validation).
async function errorText(response) {
  try {
    const detail = (await response.json()).detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).slice(-1)[0] ?? ""}: ${d.msg}`).join("; ");
  } catch { /* not JSON: fall through */ }
  return `the server answered ${response.status}`;
}

async function startJob(withFile) {
  const form = new FormData();
  form.append("count", $("count").value);
  const file = withFile ? $("file").files[0] : null;
  if (withFile) {
    if (!file) { alert("Choose a video first, or use a generated sample."); return; }
    form.append("file", file);
  }
  setBusy(true);
  showLive(file ? file.name : "generated sample", "Uploading…");
  let response;
  try {
    response = await fetch("/api/jobs", { method: "POST", body: form });
  } catch {
    stopped("Upload failed: the server could not be reached.", "error");
    return;
  }
  if (!response.ok) {  // nothing was started: no bar to stop
    $("progress").hidden = true;
    finish(`Upload refused: ${await errorText(response)}`, "error");
    return;
  }
  follow(await response.json());
  loadJobs();
}

function showLive(title, status) {
  $("live").hidden = false;
  $("live-title").textContent = title;
  $("grid").replaceChildren();
  $("progress").hidden = false;
  $("progress").removeAttribute("value");  // indeterminate until the runner says how many
  $("progress").dataset.state = "";
  $("progress-note").hidden = true;
  setStatus(status);
}

// Follow a job (one just started, or the one in the address after a reload).
function follow(job, attempt = 0) {
  const ws = new WebSocket(wsURL(job.live));
  const opened = performance.now();
  let ended = false;
  history.replaceState(null, "", `#job=${job.id}`);
  $("live").dataset.job = job.id;
  $("grid").replaceChildren();  // the server replays the job from its start
  setStatus("Waiting for a runner…");
  $("cancel").hidden = false;
  $("cancel").disabled = false;
  $("cancel").onclick = () => { ws.send("cancel"); $("cancel").disabled = true; setStatus("Cancelling…"); };
  ws.onmessage = (message) => {
    const data = JSON.parse(message.data);
    if (data.event) onEvent(data.event, opened);
    else if (data.result) {
      ended = true;
      const r = data.result;
      finish(`Done: ${r.thumbnails} thumbnails in ${r.seconds.toFixed(2)} s on runner ${r.runner}.`, "done");
    } else if (data.error) {
      ended = true;
      stopped(`Failed: ${data.error.message}`, "error");
    } else if (data.cancelled) {
      ended = true;
      stopped("Cancelled: the runner stopped the job.", "cancelled");
    }
  };
  ws.onclose = () => {
    $("cancel").hidden = true;
    if (ended) return;
    // The job goes on without us: attach again (the server replays it so far).
    setStatus(`The connection was lost; the job goes on. Reconnecting…`);
    setTimeout(() => follow(job, attempt + 1), Math.min(500 * 2 ** attempt, 10000));
  };
}

function onEvent(event, opened) {
  if (event.stage) setStatus(`Runner ${event.runner}: ${event.stage}…`);
  if (event.started) {
    const s = event.started;
    $("progress").max = s.total;
    $("progress").value = 0;
    loadJobs();  // it is running now
    setStatus(`Runner ${s.runner} is making ${s.total} thumbnails of a ${s.duration.toFixed(1)} s video…`);
  }
  if (event.thumbnail) {
    const t = event.thumbnail;
    const ms = performance.now() - opened;
    const figure = thumbnailFigure(t, `${describe(t)} · +${(ms / 1000).toFixed(2)} s`);
    figure.dataset.arrived = ms.toFixed(1);  // when it reached this page, for the curious (and the tests)
    $("grid").append(figure);
    $("progress").value = event.index + 1;
    setStatus(`${event.index + 1} of ${event.total} thumbnails…`);
  }
}

function finish(text, state) {
  history.replaceState(null, "", location.pathname + location.search);  // a reload starts fresh
  setStatus(text, state);
  setBusy(false);
  loadJobs();
}

// A failed or cancelled job: the bar stops where the job did, and says so.
function stopped(text, state) {
  const bar = $("progress");
  const done = bar.hasAttribute("value") ? bar.value : 0;
  bar.value = done;  // an indeterminate bar would keep moving
  bar.dataset.state = state;
  $("progress-note").hidden = false;
  $("progress-note").textContent = bar.max > 1 || done
    ? `Stopped at ${done} of ${bar.max} thumbnails.` : "Stopped before the first thumbnail.";
  finish(text, state);
}

function setStatus(text, state = "") {
  $("status").textContent = text;
  $("status").dataset.state = state;
}

function setBusy(busy) {
  $("upload").disabled = busy;
  $("sample").disabled = busy;
}

async function loadJobs() {
  const jobs = await (await fetch("/api/jobs")).json();
  $("no-jobs").hidden = jobs.length > 0;
  $("jobs").replaceChildren(...jobs.map((job) => {
    const item = document.createElement("li");
    item.className = "job";
    item.dataset.job = job.id;
    item.dataset.status = job.status;
    const head = document.createElement("div");
    head.className = "job-head";
    const when = new Date(job.created_at).toLocaleString();
    const runner = job.runner_id ? ` on ${job.runner_id}` : "";
    head.innerHTML = `<span class="badge"></span> <b class="name"></b> <span class="muted"></span>`;
    head.children[0].textContent = job.status;
    head.children[1].textContent = job.filename;
    head.children[2].textContent = `${job.thumbnails.length}/${job.requested} thumbnails${runner} · ${when}`;
    const strip = document.createElement("div");
    strip.className = "strip";
    strip.append(...job.thumbnails.map((t) => thumbnailFigure(t, describe(t))));
    item.append(head, strip);
    if (job.error) {
      const error = document.createElement("p");
      error.className = "error";
      error.textContent = job.error;
      item.append(error);
    }
    return item;
  }));
}

// The pool's runners, pushed by the server as they boot, work and stop.
function watchPool(attempt = 0) {
  const ws = new WebSocket(wsURL("/ws/pool"));
  ws.onopen = () => { attempt = 0; };
  ws.onmessage = (message) => {
    const s = JSON.parse(message.data);
    const chips = s.runners.map((r) => chip(r.active ? "busy" : "idle", `${r.id} · ${r.active} active`));
    for (let i = 0; i < s.booting; i++) chips.push(chip("booting", "booting…"));
    if (!chips.length) chips.push(chip("none", "none (scaled to zero)"));
    if (s.waiting) chips.push(chip("waiting", `${s.waiting} waiting`));
    $("pool").replaceChildren(...chips);
    $("pool").dataset.state = "live";
  };
  ws.onclose = () => {
    $("pool").dataset.state = "reconnecting";
    setTimeout(() => watchPool(attempt + 1), Math.min(500 * 2 ** attempt, 10000));
  };
}

function chip(state, text) {
  const span = document.createElement("span");
  span.className = "runner";
  span.dataset.state = state;
  span.textContent = text;
  return span;
}

async function resume() {
  const id = new URLSearchParams(location.hash.slice(1)).get("job");
  if (!id) return;
  const response = await fetch(`/api/jobs/${encodeURIComponent(id)}`);
  if (!response.ok) { history.replaceState(null, "", location.pathname); return; }
  const job = await response.json();
  setBusy(true);
  showLive(job.filename, "Attaching to the running job…");
  follow({ id: job.id, live: `/ws/jobs/${job.id}` });
}

$("new-job").addEventListener("submit", (e) => { e.preventDefault(); startJob(true); });
$("sample").addEventListener("click", () => startJob(false));
loadJobs();
watchPool();
resume();
