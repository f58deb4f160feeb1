// The page of raml serve: one image at a time, scored with POST /v1/score?map=overlay.
// Everything shown comes from the service's JSON through textContent (never as HTML).
"use strict";

const $ = (id) => document.getElementById(id);

function headers() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

function say(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function showWarning(body) {
  if (body.random_weights) {
    $("random-warning").textContent = body.warning;
    $("random-warning").hidden = false;
  }
}

async function loadInfo() {
  const response = await fetch("/v1/info", { headers: headers() });
  const body = await response.json();
  if (response.status === 401) {
    $("token-row").hidden = false;
    say("This service needs its bearer token: enter it above.", true);
    return;
  }
  if (!response.ok) {
    say(body.error ? body.error.message : "the service answered " + response.status, true);
    return;
  }
  showWarning(body);
  $("model").textContent = `${body.backbone} (${body.weights}, ${body.precision}); map: ${body.map}`;
  const select = $("category");
  select.replaceChildren();
  for (const name of body.categories) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = `${name} (threshold ${body.thresholds[name].value.toFixed(4)})`;
    select.append(option);
  }
  if (body.status === "ready") {
    say("Ready: drop an image.");
  } else {
    say("The models are still loading…");
    setTimeout(loadInfo, 1000);
  }
}

async function score(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("category", $("category").value);
  form.append("map", "overlay");
  say(`Scoring ${file.name}…`);
  $("result").hidden = true;
  let response;
  try {
    response = await fetch("/v1/score", { method: "POST", body: form, headers: headers() });
  } catch (err) {
    say("The service cannot be reached: " + err, true);
    return;
  }
  const body = await response.json();
  showWarning(body);
  if (!response.ok) {
    if (response.status === 401) $("token-row").hidden = false;
    say(body.error ? body.error.message : "the service answered " + response.status, true);
    return;
  }
  const result = body.results[0];
  $("decision").textContent = result.decision.toUpperCase();
  $("decision").className = result.decision;
  $("score").textContent = `score ${result.score.toFixed(4)}`;
  $("threshold").textContent = `${result.threshold.toFixed(4)} (${result.threshold_source})`;
  $("size").textContent = `${result.name}: ${result.width} × ${result.height} px, ${result.category}`;
  const t = result.timings_ms;
  $("timings").textContent =
    `decode ${t.decode} ms, crops ${t.crops} ms, queue ${t.queue} ms, model ${t.model} ms ` +
    `(${t.batch_images} image${t.batch_images > 1 ? "s" : ""} in the call), overlay ${t.map} ms`;
  $("overlay").src = "data:image/png;base64," + result.overlay_png_base64;
  $("result").hidden = false;
  say(body.random_weights ? "Scored. RANDOM WEIGHTS: the score is not meaningful." : "Scored.");
}

window.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => score(event.target.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    score(event.dataTransfer.files[0]);
  });
  $("token").addEventListener("change", loadInfo);
  loadInfo().catch((err) => say("The service cannot be reached: " + err, true));
});
