// ZIT Cluster web UI: generate images with a per-step progress bar, and watch the fleet.
// Plain browser JavaScript, no dependencies, so the page works offline.
"use strict";

// Each image is its own streamed request (seed, seed + 1, ...), so every image shows its own progress bar and
// appears as soon as it is done. Browsers open about six connections per host: stay well under that so the
// fleet view keeps refreshing while images are made.
const MAX_PARALLEL_IMAGES = 3;
const FLEET_REFRESH_MS = 2000;

const $ = (id) => document.getElementById(id);

function headers() {
  const key = localStorage.getItem("zit-api-key");
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function errorMessage(body, status) {
  if (body && body.error && body.error.message) return body.error.message;
  return `HTTP ${status}`;
}

// -- server-sent events over fetch (EventSource cannot POST) ---------------------------------------------------

async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      const text = data.join("\n");
      let parsed = text;
      try { parsed = JSON.parse(text); } catch (_) { /* plain text, e.g. [DONE] */ }
      yield [event, parsed];
    }
  }
}

// -- one image tile ------------------------------------------------------------------------------------------------

function makeTile(batch, index, total) {
  const tile = document.createElement("figure");
  tile.className = "tile";
  tile.innerHTML = `
    <div class="frame"><span class="placeholder">queued</span></div>
    <div class="progress" role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow="0">
      <div class="bar"></div></div>
    <figcaption>image ${index + 1} of ${total}</figcaption>`;
  batch.append(tile);
  return {
    element: tile,
    progress(step, steps, eta) {
      const pct = steps ? Math.round((100 * step) / steps) : 0;
      tile.querySelector(".bar").style.width = `${pct}%`;
      tile.querySelector(".progress").setAttribute("aria-valuenow", String(pct));
      const etaText = eta === null || eta === undefined ? "" : `, ${eta.toFixed(1)} s left`;
      tile.querySelector(".placeholder").textContent = `step ${step} / ${steps}${etaText}`;
      tile.dataset.step = String(step);
    },
    done(item, meta) {
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${item.b64_json}`;
      img.alt = `seed ${item.seed}`;
      tile.querySelector(".frame").replaceChildren(img);
      tile.querySelector(".progress").classList.add("finished");
      const chunk = (meta.chunks || [])[0] || {};
      tile.querySelector("figcaption").textContent =
        `seed ${item.seed} · ${meta.seconds.toFixed(2)} s · ${chunk.tier || ""}`;
      tile.classList.add("done");
    },
    fail(message) {
      tile.querySelector(".frame").innerHTML = "";
      const p = document.createElement("p");
      p.className = "error";
      p.textContent = message;
      tile.querySelector(".frame").append(p);
      tile.classList.add("failed");
    },
  };
}

async function generateOne(body, tile) {
  tile.progress(0, body.steps, null);
  const response = await fetch("/v1/images/generations/stream", {
    method: "POST", headers: headers(), body: JSON.stringify(body),
  });
  if (!response.ok) {
    let payload = null;
    try { payload = await response.json(); } catch (_) { /* not JSON */ }
    throw new Error(errorMessage(payload, response.status));
  }
  for await (const [event, data] of readEvents(response)) {
    if (event === "progress") tile.progress(data.step, data.steps, data.eta_s);
    else if (event === "result") tile.done(data.data[0], data.metadata || {});
    else if (event === "error") throw new Error(errorMessage(data, data.status));
  }
}

async function onGenerate(event) {
  event.preventDefault();
  localStorage.setItem("zit-api-key", $("api-key").value);
  const n = Number($("n").value) || 1;
  const seedText = $("seed").value.trim();
  const base = {
    prompt: $("prompt").value,
    size: `${$("width").value}x${$("height").value}`,
    steps: Number($("steps").value) || 9,
    n: 1,
    response_format: "b64_json",
  };
  if ($("lora").value) {
    base.lora = $("lora").value;
    base.lora_scale = Number($("lora-scale").value);
  }
  // The newest batch goes first; its images stay in seed order.
  const batch = document.createElement("div");
  batch.className = "batch";
  $("gallery").prepend(batch);
  const jobs = [];
  for (let i = 0; i < n; i += 1) {
    const body = { ...base };
    if (seedText !== "") body.seed = Number(seedText) + i;
    jobs.push({ body, tile: makeTile(batch, i, n) });
  }
  $("generate").disabled = true;
  $("status").textContent = `generating ${n} image${n > 1 ? "s" : ""}…`;
  let failures = 0;
  const queue = jobs.slice();
  async function worker() {
    while (queue.length) {
      const job = queue.shift();
      try {
        await generateOne(job.body, job.tile);
      } catch (err) {
        failures += 1;
        job.tile.fail(err.message);
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(MAX_PARALLEL_IMAGES, n) }, worker));
  $("generate").disabled = false;
  $("status").textContent = failures ? `${failures} of ${n} failed` : "done";
}

// -- fleet view ----------------------------------------------------------------------------------------------------

function cell(text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

function vramCell(card) {
  const td = document.createElement("td");
  const total = card.memory_total_gib ?? card.vram_gb;
  const used = card.memory_used_gib;
  const meter = document.createElement("div");
  meter.className = "meter";
  const fill = document.createElement("div");
  fill.className = "fill";
  const fraction = used != null && total ? Math.min(1, used / total) : 0;
  fill.style.width = `${(100 * fraction).toFixed(1)}%`;
  if (fraction > 0.9) fill.classList.add("high");
  meter.append(fill);
  const label = document.createElement("span");
  label.className = "meter-label";
  label.textContent = used != null ? `${used.toFixed(1)} / ${Number(total).toFixed(1)} GiB` : `? / ${total} GB`;
  td.append(meter, label);
  return td;
}

function cardState(card) {
  if (!card.node_alive) return ["node down", "bad"];
  if (card.error) return [`error: ${card.error}`, "bad"];
  if (!card.replica) return ["no replica", "muted"];
  return card.busy ? ["busy", "busy"] : ["idle", "ok"];
}

function renderFleet(fleet) {
  const rows = fleet.cards.map((card) => {
    const tr = document.createElement("tr");
    tr.className = "card";
    const [state, stateClass] = cardState(card);
    const name = `${card.name || "card"}${card.simulated ? " (simulated)" : ""}`;
    const replicas = (card.replicas || []).map((r) => r.slice(0, 8)).join(", ");
    const tier = card.slots > 1 ? `${card.tier} × ${card.slots} slots` : (card.tier || "-");
    tr.append(cell(name), cell(tier), vramCell(card),
      cell(replicas || "-", "mono"),
      cell(card.loras && card.loras.length ? `${state} · LoRA ${card.loras.join(", ")}` : state, `state ${stateClass}`));
    return tr;
  });
  $("fleet-cards").replaceChildren(...rows);
  $("fleet-empty").hidden = fleet.cards.length > 0;
  const tiers = fleet.tiers.map((tier) => {
    const div = document.createElement("div");
    div.className = "tier";
    const q = tier.queue || {};
    const queue = q.running === undefined ? "" : ` · running ${q.running}, waiting ${q.waiting}`;
    div.textContent = `${tier.name}: ${tier.replicas_running}/${tier.replicas_target} replicas, ` +
      `${tier.cards} card${tier.cards === 1 ? "" : "s"}${queue}`;
    return div;
  });
  $("fleet-tiers").replaceChildren(...tiers);
  $("fleet-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function refreshFleet() {
  try {
    const response = await fetch("/v1/fleet", { headers: headers() });
    const body = await response.json();
    if (!response.ok) throw new Error(errorMessage(body, response.status));
    renderFleet(body);
  } catch (err) {
    $("fleet-updated").textContent = `fleet unavailable: ${err.message}`;
  } finally {
    setTimeout(refreshFleet, FLEET_REFRESH_MS);
  }
}

async function showLoras() {
  // The adapters of the service's LoRA folder; the row stays hidden when the service has none.
  try {
    const response = await fetch("/v1/loras", { headers: headers() });
    const body = await response.json();
    if (!response.ok || !body.enabled) return;
    const options = body.data.filter((a) => !a.error).map((a) => {
      const option = document.createElement("option");
      option.value = a.name;
      option.textContent = a.name;
      return option;
    });
    $("lora").append(...options);
    $("lora-row").hidden = false;
  } catch (_) { /* no LoRA choice; generating still works */ }
}

async function showModel() {
  try {
    const response = await fetch("/healthz");
    const body = await response.json();
    $("model").textContent = body.model;
  } catch (_) { /* the header pill is decoration */ }
}

$("api-key").value = localStorage.getItem("zit-api-key") || "";
$("generate-form").addEventListener("submit", onGenerate);
showModel();
showLoras();
refreshFleet();
