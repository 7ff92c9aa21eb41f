// The browser page: plain JavaScript over the public API (no framework, no build step).
// Relative URLs, so the page also works behind a reverse proxy's path prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], defaultModel: null };

// -- talking to the API -------------------------------------------------------------------

// An API failure as one readable sentence: the service's own message, plus what to do.
class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }

  get readable() {
    const retry = this.retryAfter ? ` Retry in ${this.retryAfter} s.` : "";
    return `${this.message}${retry} (HTTP ${this.status}${this.code ? ", " + this.code : ""})`;
  }
}

async function call(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new ApiError(0, "unreachable", `The service could not be reached: ${err.message}.`);
  }
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const error = body && body.error;
    const message = (error && error.message) || text.slice(0, 300) || response.statusText;
    throw new ApiError(response.status, error && error.code, message,
                       response.headers.get("Retry-After"));
  }
  return body;
}

function query(params) {
  const pairs = Object.entries(params).filter(([, v]) => v !== null && v !== "");
  return pairs.length ? "?" + new URLSearchParams(pairs).toString() : "";
}

function modelPath(model, version) {
  const m = encodeURIComponent(model);
  return version ? `v1/models/${m}/versions/${encodeURIComponent(version)}` : `v1/models/${m}`;
}

// -- models and versions ------------------------------------------------------------------

async function loadModels() {
  try {
    const list = await call("v1/models");
    state.models = list.models;
    state.defaultModel = list.default_model;
    fillModels();
    const ready = state.models.some((m) => m.default_version !== null);
    $("service-state").textContent = ready ? "" : "no model is ready yet…";
    if (!ready) setTimeout(loadModels, 2000);
  } catch (err) {
    $("service-state").textContent = `service starting: ${err.message}`;
    setTimeout(loadModels, 2000);
  }
}

function fillModels() {
  const select = $("model");
  const chosen = select.value || state.defaultModel;
  select.replaceChildren(...state.models.map((m) => new Option(m.name, m.name)));
  if (state.models.some((m) => m.name === chosen)) select.value = chosen;
  fillVersions();
}

function fillVersions() {
  const model = state.models.find((m) => m.name === $("model").value);
  const select = $("version");
  const chosen = select.value;
  const options = [];
  if (model) {
    const shown = model.default_version === null ? "none ready" : `v${model.default_version}`;
    options.push(new Option(`default (${shown})`, ""));
    for (const v of [...model.versions].reverse()) {
      const aliases = v.aliases.length ? ` [${v.aliases.join(", ")}]` : "";
      const option = new Option(`v${v.version}${aliases} — ${v.state}`, String(v.version));
      option.disabled = v.state !== "ready";
      options.push(option);
    }
  }
  select.replaceChildren(...options);
  if ([...select.options].some((o) => o.value === chosen && !o.disabled)) select.value = chosen;
}

// -- results ------------------------------------------------------------------------------

// One card per file; a request's cards stay in upload order, the newest request on top.
function newCards(files) {
  const batch = document.createElement("div");
  batch.className = "batch";
  $("results").prepend(batch);
  return files.map((file) => {
    const card = $("result-template").content.firstElementChild.cloneNode(true);
    const thumb = card.querySelector(".thumb");
    thumb.addEventListener("error", () => { thumb.hidden = true; });  // not an image
    thumb.src = URL.createObjectURL(file);
    card.querySelector(".filename").textContent = file.name;
    batch.append(card);
    return card;
  });
}

function showCardError(card, message) {
  card.querySelector(".label").textContent = "not classified";
  const error = card.querySelector(".error");
  error.textContent = message;
  error.hidden = false;
  card.querySelector(".overlay-note").textContent = "";
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

function renderPrediction(card, prediction, answer, latencyMs) {
  const label = card.querySelector(".label");
  label.textContent = prediction.uncertain
    ? `uncertain (below ${percent(answer.min_confidence)})`
    : prediction.label;
  label.classList.toggle("uncertain", prediction.uncertain);
  const rows = prediction.top_k.map((score) => {
    const row = document.createElement("li");
    row.className = "bar-row";
    const name = document.createElement("span");
    name.className = "bar-label";
    name.textContent = score.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = percent(score.confidence);
    bar.append(fill);
    const pct = document.createElement("span");
    pct.className = "bar-pct";
    pct.textContent = percent(score.confidence);
    row.append(name, bar, pct);
    return row;
  });
  card.querySelector(".bars").replaceChildren(...rows);
  card.querySelector(".answered-by").textContent =
    `${answer.model} v${answer.version} · ${answer.backend} ${answer.precision} · ` +
    `${Math.round(latencyMs)} ms`;
}

async function classify(files) {
  if (!files.length) return;
  $("banner").hidden = true;
  const model = $("model").value;
  if (!model) {
    showBanner("No model to ask yet: wait until the service has loaded one.");
    return;
  }
  const cards = newCards(files);
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const url = modelPath(model, $("version").value) + "/predict" + query({
    top_k: $("top-k").value,
    min_confidence: $("min-confidence").value,
  });
  const started = performance.now();
  let answer;
  try {
    answer = await call(url, { method: "POST", body: form });
  } catch (err) {
    const message = err instanceof ApiError ? err.readable : String(err);
    showBanner(message);
    for (const card of cards) showCardError(card, message);
    return;
  }
  const latency = performance.now() - started;
  answer.predictions.forEach((prediction, i) => {
    if (prediction.status === "ok") {
      renderPrediction(cards[i], prediction, answer, latency);
    } else {
      showCardError(cards[i], prediction.error.message);
    }
  });
  // One at a time: explanations have a small bound of their own on the service.
  for (const [i, prediction] of answer.predictions.entries()) {
    if (prediction.status === "ok") await explainInto(cards[i], files[i], answer, null);
  }
}

async function explainInto(card, file, answer, target) {
  const note = card.querySelector(".overlay-note");
  note.textContent = "explaining…";
  const form = new FormData();
  form.append("files", file, file.name);
  const url = modelPath(answer.model, String(answer.version)) + "/explain" +
    query({ top_k: 1, target: target });
  let explained;
  try {
    explained = (await call(url, { method: "POST", body: form })).explanations[0];
  } catch (err) {
    note.textContent = "no overlay: " + (err instanceof ApiError ? err.readable : String(err));
    return;
  }
  if (explained.status !== "ok") {
    note.textContent = "no overlay: " + explained.error.message;
    return;
  }
  showOverlay(card, file, answer, explained, await classesOf(answer.model, answer.version));
}

function showOverlay(card, file, answer, explained, classes) {
  const img = card.querySelector(".overlay");
  const kind = card.querySelector(".map-kind");
  const target = card.querySelector(".target");
  const maps = { grad_cam: explained.grad_cam, attention: explained.attention };
  const draw = () => {
    const map = maps[kind.value] || maps.grad_cam;
    img.src = "data:image/png;base64," + map.overlay_png;
    img.hidden = false;
  };
  kind.hidden = !explained.attention;
  if (!explained.attention) kind.value = "grad_cam";
  kind.onchange = draw;
  target.replaceChildren(...classes.map((c) => new Option(`Grad-CAM of ${c}`, c)));
  target.value = explained.target.label;
  target.hidden = classes.length === 0;
  target.onchange = () => explainInto(card, file, answer, target.value);
  card.querySelector(".overlay-note").textContent =
    `p(${explained.target.label}) = ${percent(explained.target.confidence)}`;
  card.dataset.target = explained.target.label;
  draw();
}

// The classes the page can ask Grad-CAM for: those of the version's model.json.
const classCache = new Map();
async function classesOf(model, version) {
  const key = `${model}/${version}`;
  if (!classCache.has(key)) {
    try {
      const detail = await call(modelPath(model, String(version)));
      classCache.set(key, detail.metadata ? detail.metadata.class_names : []);
    } catch (_) {
      return [];
    }
  }
  return classCache.get(key);
}

function showBanner(message) {
  $("banner").textContent = message;
  $("banner").hidden = false;
}

// -- input: file picker, drag and drop, camera -----------------------------------------------

function setUpInputs() {
  for (const id of ["files", "capture"]) {
    $(id).addEventListener("change", (event) => {
      classify([...event.target.files]);
      event.target.value = "";
    });
  }
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    classify([...event.dataTransfer.files]);
  });
  $("model").addEventListener("change", fillVersions);
  setUpCamera();
}

function setUpCamera() {
  const button = $("camera");
  if (!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia)) {
    button.disabled = true;
    $("camera-note").textContent =
      "The live camera needs a browser that allows it on this address (HTTPS or localhost).";
    return;
  }
  const dialog = $("camera-dialog");
  const video = $("camera-video");
  let stream = null;
  const stop = () => {
    if (stream) stream.getTracks().forEach((track) => track.stop());
    stream = null;
    dialog.close();
  };
  button.addEventListener("click", async () => {
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } });
    } catch (err) {
      showBanner(`The camera is not available: ${err.message}`);
      return;
    }
    video.srcObject = stream;
    dialog.showModal();
  });
  $("camera-close").addEventListener("click", stop);
  $("camera-shoot").addEventListener("click", () => {
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    canvas.toBlob((blob) => {
      stop();
      classify([new File([blob], `camera-${Date.now()}.jpg`, { type: "image/jpeg" })]);
    }, "image/jpeg", 0.92);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setUpInputs();
  loadModels();
});
