// The search page: a text box, mode / reranker toggles, drag-and-drop image queries, and a grid of hits
// with their scores and matched word-pieces. Thumbnails are fetched with the API key header when one is set.
"use strict";

const $ = (id) => document.getElementById(id);
let queryImage = null;   // File of the image query, if any
let info = null;
let searchSeq = 0;       // answers to older searches are dropped

function apiHeaders() {
  const key = $("api-key").value || sessionStorage.getItem("stair-api-key") || "";
  return key ? { "X-API-Key": key } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...apiHeaders(), ...(options.headers || {}) } });
  if (response.status === 401) { $("key-label").hidden = false; }
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const detail = body && body.detail;
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail || response.statusText));
  }
  return body;
}

async function loadInfo() {
  try {
    info = await api("/info");
  } catch (error) {
    $("status").textContent = "Could not load the server's options: " + error.message;
    info = { indexes: [], modes: ["hybrid", "sparse", "dense"], rerankers: [] };
  }
  const modes = info.modes.includes("auto") ? ["auto", ...info.modes.filter((m) => m !== "auto")] : info.modes;
  $("mode").replaceChildren(...modes.map((m) => new Option(m, m, m === modes[0], m === modes[0])));
  $("rerankers").replaceChildren(...info.rerankers.map((name) => {
    const label = document.createElement("label");
    const box = Object.assign(document.createElement("input"), { type: "checkbox", value: name, className: "rerank" });
    label.append(box, " " + name);
    return label;
  }));
  if (info.indexes.length) {
    const first = info.indexes[0];
    const sparse = { heads: "", concepts: ", sparse words training-free (concept similarity)",
                     none: ", no sparse words" }[first.sparse || "heads"] ?? "";
    $("index-info").textContent = `${first.name}: ${first.documents} documents, model ${first.model}${sparse}`;
  }
}

function setImage(file) {
  if (!file || !file.type.startsWith("image/")) { $("status").textContent = "That is not an image file."; return; }
  queryImage = file;
  $("image-preview").src = URL.createObjectURL(file);
  $("image-chip").hidden = false;
  search();
}

function clearImage() {
  queryImage = null;
  $("image-chip").hidden = true;
  $("image-file").value = "";
}

async function search(event) {
  if (event) event.preventDefault();
  const text = $("query").value.trim();
  if (!text && !queryImage) { $("status").textContent = "Type a query or drop an image."; return; }
  const fields = {
    mode: $("mode").value, k: Number($("k").value) || 24, explain: true,
    rerank: [...document.querySelectorAll(".rerank:checked")].map((b) => b.value),
  };
  if (text) fields.query = text;
  const form = new FormData();
  form.append("request", JSON.stringify(fields));
  if (queryImage) form.append("image", queryImage);
  const seq = ++searchSeq;
  $("status").textContent = "Searching…";
  try {
    const result = await api("/search", { method: "POST", body: form });
    if (seq !== searchSeq) return;
    render(result);
  } catch (error) {
    if (seq !== searchSeq) return;
    $("status").innerHTML = "";
    $("status").append(Object.assign(document.createElement("span"), { className: "error", textContent: error.message }));
    $("results").replaceChildren();
  }
}

function render(result) {
  const decision = result.decision && result.decision.reason ? ` — ${result.decision.reason}` : "";
  $("status").textContent = `${result.hits.length} hits in ${result.took_ms.toFixed(1)} ms, mode ${result.mode}` +
    (result.fusion ? ` (${result.fusion})` : "") + decision;
  $("results").replaceChildren(...result.hits.map(card));
}

function card(hit) {
  const item = Object.assign(document.createElement("figure"), { className: "hit" });
  item.dataset.id = hit.id;
  const image = Object.assign(document.createElement("img"), { alt: hit.caption || hit.id, loading: "lazy" });
  loadThumbnail(image, hit.thumbnail);
  const parts = Object.entries(hit.parts).map(([route, score]) => `${route} ${score.toFixed(3)}`).join(" · ");
  const caption = document.createElement("figcaption");
  caption.append(
    Object.assign(document.createElement("div"), { className: "id", textContent: `${hit.rank}. ${hit.id}` }),
    Object.assign(document.createElement("div"), { className: "caption", textContent: hit.caption }),
    Object.assign(document.createElement("div"), { className: "score", textContent: `score ${hit.score.toFixed(4)}` }),
    Object.assign(document.createElement("div"), { className: "muted", textContent: parts }),
  );
  const tokens = Object.assign(document.createElement("div"), { className: "tokens" });
  for (const m of hit.matched.slice(0, 8)) {
    tokens.append(Object.assign(document.createElement("span"), {
      className: "token", textContent: m.token, title: `query ${m.query.toFixed(2)} × document ${m.document.toFixed(2)}`,
    }));
  }
  caption.append(tokens);
  item.append(image, caption);
  return item;
}

async function loadThumbnail(image, url) {
  // A document whose stored image cannot be served (moved, or outside the index's sources) keeps its card,
  // marked "missing", instead of a broken image.
  image.addEventListener("error", () => image.classList.add("missing"), { once: true });
  const headers = apiHeaders();
  if (!Object.keys(headers).length) { image.src = url; return; }
  const response = await fetch(url, { headers });
  if (response.ok) image.src = URL.createObjectURL(await response.blob());
  else image.classList.add("missing");
}

function setUpDragAndDrop() {
  const zone = $("dropzone");
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.remove("over"); });
  }
  zone.addEventListener("drop", (e) => setImage(e.dataTransfer.files[0]));
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", search);
  $("pick-image").addEventListener("click", () => $("image-file").click());
  $("image-file").addEventListener("change", (e) => setImage(e.target.files[0]));
  $("clear-image").addEventListener("click", clearImage);
  $("api-key").addEventListener("change", (e) => { sessionStorage.setItem("stair-api-key", e.target.value); loadInfo(); });
  setUpDragAndDrop();
  loadInfo();
});
