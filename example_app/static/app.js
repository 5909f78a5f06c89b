// The page: start a job, follow it live over a WebSocket, list past jobs from the database.
"use strict";

const $ = (id) => document.getElementById(id);

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

async function startJob(withFile) {
  const form = new FormData();
  form.append("count", $("count").value);
  if (withFile) {
    const file = $("file").files[0];
    if (!file) { alert("Choose a video first, or use a generated sample."); return; }
    form.append("file", file);
  }
  setBusy(true);
  showLive(withFile ? $("file").files[0].name : "generated sample", "Uploading…");
  const response = await fetch("/api/jobs", { method: "POST", body: form });
  if (!response.ok) {
    finish(`Upload failed: ${response.status} ${await response.text()}`, "error");
    return;
  }
  follow(await response.json());
}

function showLive(title, status) {
  $("live").hidden = false;
  $("live-title").textContent = title;
  $("grid").replaceChildren();
  $("progress").removeAttribute("value");  // indeterminate until the runner says how many
  setStatus(status);
}

function follow(job) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}${job.live}`);
  const opened = performance.now();
  let ended = false;
  $("live").dataset.job = job.id;
  setStatus("Waiting for a runner…");
  $("cancel").hidden = false;
  $("cancel").onclick = () => ws.send("cancel");  // the server cancels the job on its runner
  ws.onmessage = (message) => {
    const data = JSON.parse(message.data);
    if (data.event) onEvent(data.event, opened);
    else if (data.result) {
      ended = true;
      const r = data.result;
      finish(`Done: ${r.thumbnails} thumbnails in ${r.seconds.toFixed(2)} s on runner ${r.runner}.`, "done");
    } else if (data.error) {
      ended = true;
      finish(`Failed: ${data.error.type}: ${data.error.message}`, "error");
    }
  };
  ws.onclose = (e) => {
    $("cancel").hidden = true;
    if (!ended) finish(e.code === 1000 ? "Cancelled: the runner stopped the job." : "The connection was lost.", "error");
  };
}

function onEvent(event, opened) {
  if (event.stage) setStatus(`Runner ${event.runner}: ${event.stage}…`);
  if (event.started) {
    const s = event.started;
    loadPool();
    $("progress").max = s.total;
    $("progress").value = 0;
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
  setStatus(text, state);
  setBusy(false);
  loadJobs();
  loadPool();
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
    head.innerHTML = `<span class="badge"></span> <b></b> <span class="muted"></span>`;
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

async function loadPool() {
  try {
    const s = await (await fetch("/api/stats")).json();
    const runners = s.runners.map((r) => `${r.id} (${r.active} active)`).join(", ") || "none (scaled to zero)";
    $("pool").textContent = `runners ${runners}` + (s.booting ? ` · ${s.booting} booting` : "");
  } catch { /* the server is restarting: try again at the next tick */ }
}

$("new-job").addEventListener("submit", (e) => { e.preventDefault(); startJob(true); });
$("sample").addEventListener("click", () => startJob(false));
loadJobs();
loadPool();
setInterval(loadPool, 2000);
