// The search page: a text box, index / mode / reranker choices, drag-and-drop image queries, and a grid of hits
// with their scores and matched words. The status line names what was searched (the image and the text in the
// box together, when both are there). A hit opens a detail view with a link to the stored image at its own size
// and "Find similar". The query, mode, index
// and k live in the page's URL (/?q=...&mode=...&index=...&k=..., or like=<id>), so a search can be shared,
// reloaded and stepped through with Back. Thumbnails of local sources come from this server (with the API key
// header when one is set); URL-sourced documents are shown by the browser loading their URL, without the key.
"use strict";

const $ = (id) => document.getElementById(id);
const query = { image: null, like: null };  // the image file or the {id, caption} of "find similar", if any
let info = null;
let searchSeq = 0;       // answers to older searches are dropped
let shown = null;        // the hit in the detail view

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
  $("index").replaceChildren(...info.indexes.map((x, i) => new Option(x.name, x.name, i === 0, i === 0)));
  $("index-label").hidden = info.indexes.length < 2;
  describeIndex();
}

function describeIndex() {
  const chosen = info.indexes.find((x) => x.name === $("index").value) || info.indexes[0];
  if (!chosen) { $("index-info").textContent = ""; return; }
  const sparse = { heads: "", concepts: ", sparse words training-free (concept similarity)",
                   none: ", no sparse words" }[chosen.sparse || "heads"] ?? "";
  $("index-info").textContent = `${chosen.name}: ${chosen.documents} documents, model ${chosen.model}${sparse}`;
}

// ----------------------------------------------------------------------------------------- the page's URL

function stateFromUrl() {
  const params = new URLSearchParams(location.search);
  $("query").value = params.get("q") || "";
  for (const name of ["mode", "index"]) {
    const value = params.get(name);
    if (value && [...$(name).options].some((o) => o.value === value)) $(name).value = value;
  }
  if (params.get("k")) $("k").value = params.get("k");
  $("feedback").value = params.get("feedback") || "";
  setLike(params.get("like") ? { id: params.get("like"), caption: params.get("like") } : null);
  describeIndex();
  return Boolean($("query").value.trim() || query.like);
}

function urlOfState() {
  const params = new URLSearchParams();
  if (query.like) params.set("like", query.like.id);
  else if ($("query").value.trim()) params.set("q", $("query").value.trim());
  params.set("mode", $("mode").value);
  if (!$("index-label").hidden) params.set("index", $("index").value);
  params.set("k", $("k").value);
  if ($("feedback").value !== "") params.set("feedback", $("feedback").value);
  return "?" + params.toString();
}

function rememberInUrl() {
  if (query.image) return;  // an image query is not in the URL: there is nothing to share but the file
  const url = urlOfState();
  if (url !== location.search) history.pushState(null, "", url);
}

// ----------------------------------------------------------------------------------------------- queries

function setImage(file) {
  if (!file || !file.type.startsWith("image/")) { $("status").textContent = "That is not an image file."; return; }
  setLike(null);
  query.image = file;
  $("image-preview").src = URL.createObjectURL(file);
  $("image-chip").hidden = false;
  search();
}

function clearImage() {
  query.image = null;
  $("image-chip").hidden = true;
  $("image-file").value = "";
}

function setLike(like) {
  query.like = like;
  $("like-chip").hidden = !like;
  $("like-label").textContent = like ? like.caption || like.id : "";
}

async function search(event, fromHistory = false) {
  if (event) event.preventDefault();
  const text = $("query").value.trim();
  if (event && text) setLike(null);  // a typed query replaces "find similar"
  if (!text && !query.image && !query.like) { $("status").textContent = "Type a query or drop an image."; return; }
  const fields = {
    mode: $("mode").value, k: Number($("k").value) || 24, explain: true,
    rerank: [...document.querySelectorAll(".rerank:checked")].map((b) => b.value),
  };
  if ($("index").value) fields.index = $("index").value;
  if (query.like) fields.like = query.like.id;
  else if (text) fields.query = text;
  // feedback refines the dense query of a text or image query (the API refuses it with "like")
  if ($("feedback").value !== "" && !query.like) fields.feedback = Number($("feedback").value);
  const form = new FormData();
  form.append("request", JSON.stringify(fields));
  if (query.image && !query.like) form.append("image", query.image);
  if (!fromHistory) rememberInUrl();
  const seq = ++searchSeq;
  const what = searchedFor(fields, Boolean(query.image && !query.like));
  $("status").textContent = `Searching ${what}…`;
  try {
    const result = await api("/search", { method: "POST", body: form });
    if (seq !== searchSeq) return;
    render(result, what, Boolean(query.image && fields.query));
  } catch (error) {
    if (seq !== searchSeq) return;
    $("status").innerHTML = "";
    $("status").append(Object.assign(document.createElement("span"), { className: "error", textContent: error.message }));
    $("note").hidden = true;
    $("results").replaceChildren();
  }
}

// What a search sends, in words: an image with text in the box searches both (the text refines the image's
// vectors and, where the index has captions, searches them too), and the status says so.
function searchedFor(fields, withImage) {
  if (fields.like) return `documents like “${query.like.caption || fields.like}”`;
  if (withImage && fields.query) return `the image and the text “${fields.query}”`;
  return withImage ? "the image" : `“${fields.query}”`;
}

// ------------------------------------------------------------------------------------------------ results

function render(result, what, imageAndText) {
  const decision = result.decision || {};
  const reason = decision.reason ? ` — ${decision.reason}` : "";
  const alone = imageAndText ? " (clear the text box to search by the image alone)" : "";
  $("status").textContent = `${result.hits.length} hits for ${what} in ${result.took_ms.toFixed(1)} ms, mode ` +
    `${result.mode}` + (result.fusion ? ` (${result.fusion})` : "") + reason + alone;
  $("note").textContent = decision.note || "";
  $("note").hidden = !decision.note;
  $("results").replaceChildren(...result.hits.map(card));
}

function isRemote(url) {
  return /^https?:\/\//i.test(url) && new URL(url).origin !== location.origin;
}

function wordChips(hit, limit) {
  // Only words: punctuation and grammar words ("," "." "and") are true matches that explain nothing.
  const chips = hit.matched.filter((m) => m.word).slice(0, limit).map((m) => Object.assign(
    document.createElement("span"),
    { className: "token", textContent: m.of ? `${m.token}… (${m.of})` : m.token,
      title: (m.of ? `the piece "${m.token}" of "${m.of}": ` : "") +
        `query ${m.query.toFixed(2)} × document ${m.document.toFixed(2)}` }));
  const text = Object.entries(hit.text_matched || {}).map(([word, count]) => Object.assign(
    document.createElement("span"), { className: "token text", textContent: word, title: `in the caption ${count}×` }));
  return [...chips, ...text];
}

function card(hit) {
  const item = Object.assign(document.createElement("figure"), { className: "hit", tabIndex: 0 });
  item.dataset.id = hit.id;
  const image = Object.assign(document.createElement("img"), { alt: hit.caption || hit.id, loading: "lazy" });
  loadImage(image, hit.thumbnail);
  const parts = Object.entries(hit.parts).map(([route, score]) => `${route} ${score.toFixed(3)}`).join(" · ");
  const caption = document.createElement("figcaption");
  caption.append(Object.assign(document.createElement("div"),
                               { className: "title", textContent: `${hit.rank}. ${hit.caption || hit.id}` }));
  if (hit.caption) caption.append(Object.assign(document.createElement("div"), { className: "id muted", textContent: hit.id }));
  caption.append(
    Object.assign(document.createElement("div"), { className: "score", textContent: `score ${hit.score.toFixed(4)}` }),
    Object.assign(document.createElement("div"), { className: "muted", textContent: parts }),
  );
  const tokens = Object.assign(document.createElement("div"), { className: "tokens" });
  tokens.append(...wordChips(hit, 8));
  caption.append(tokens);
  item.append(image, caption);
  item.addEventListener("click", () => openDetail(hit));
  item.addEventListener("keydown", (e) => { if (e.key === "Enter") openDetail(hit); });
  return item;
}

async function loadImage(image, url) {
  // A document whose stored image cannot be served (moved, or outside the index's sources) keeps its card,
  // marked "missing", instead of a broken image.
  image.addEventListener("error", () => image.classList.add("missing"), { once: true });
  image.classList.remove("missing");
  if (isRemote(url)) {  // a URL-sourced document: the browser loads it; the API key never leaves for that host
    image.referrerPolicy = "no-referrer";
    image.src = url;
    return;
  }
  const headers = apiHeaders();
  if (!Object.keys(headers).length) { image.src = url; return; }
  const response = await fetch(url, { headers });
  if (response.ok) image.src = URL.createObjectURL(await response.blob());
  else image.classList.add("missing");
}

// ------------------------------------------------------------------------------------------- detail view

function openDetail(hit) {
  shown = hit;
  $("detail-image").alt = hit.caption || hit.id;
  loadImage($("detail-image"), isRemote(hit.thumbnail) ? hit.thumbnail : hit.thumbnail + "&size=512");
  $("detail-title").textContent = hit.caption || hit.id;
  const rows = [["id", hit.id], ["source", hit.source], ["rank", hit.rank], ["score", hit.score.toFixed(4)],
                ...Object.entries(hit.parts).map(([route, score]) => [route, score.toFixed(4)]),
                ...photoRows(hit.metadata || {}),
                ...Object.entries(hit.metadata || {}).filter(([key]) => !PHOTO_FIELDS.includes(key))];
  $("detail-fields").replaceChildren(...rows.flatMap(([key, value]) => {
    const dd = document.createElement("dd");
    const text = typeof value === "string" ? value : JSON.stringify(value);
    const link = key === "source" && /^https?:\/\//i.test(text) ? text : key === "place" ? mapUrl(hit.metadata) : null;
    if (link) {
      dd.append(Object.assign(document.createElement("a"), { href: link, textContent: text, rel: "noreferrer", target: "_blank" }));
    } else dd.textContent = text;
    return [Object.assign(document.createElement("dt"), { textContent: key }), dd];
  }));
  $("detail-tokens").replaceChildren(...wordChips(hit, 64));
  $("detail-original").href = originalUrl(hit);
  $("detail").showModal();
}

// The stored image at its own size: /images/<id> for a local source (re-encoded by the server, as thumbnails
// are), the URL itself for a URL-sourced document.
function originalUrl(hit) {
  return hit.thumbnail.startsWith("/thumbnails/") ? "/images/" + hit.thumbnail.slice("/thumbnails/".length) : hit.source;
}

async function openOriginal(event) {
  // With an API key the link cannot carry the header: fetch it with the key and open what came back.
  const headers = apiHeaders();
  const url = $("detail-original").href;
  if (!Object.keys(headers).length || isRemote(url)) return;
  event.preventDefault();
  const opened = window.open("", "_blank");
  const response = await fetch(url, { headers });
  if (!response.ok) { if (opened) opened.close(); return; }
  const blob = URL.createObjectURL(await response.blob());
  if (opened) opened.location = blob; else location.assign(blob);
}

// A photo's EXIF fields (taken_at, camera, latitude/longitude with --exif gps) come first, the place as one row
// that links to a map (opened only when clicked: the page itself sends the position nowhere); then a folder
// source's own fields: the folder it is in (the last of `folder`, which lists the folders above it too, for
// filters), its size and modification time.
const PHOTO_FIELDS = ["taken_at", "camera", "latitude", "longitude", "folder", "size", "modified"];

function photoRows(metadata) {
  const rows = [];
  if (typeof metadata.taken_at === "string") rows.push(["taken_at", metadata.taken_at]);
  if (typeof metadata.camera === "string") rows.push(["camera", metadata.camera]);
  if (typeof metadata.latitude === "number" && typeof metadata.longitude === "number") {
    rows.push(["place", `${metadata.latitude.toFixed(5)}, ${metadata.longitude.toFixed(5)}`]);
  }
  if (Array.isArray(metadata.folder) && metadata.folder.length) rows.push(["folder", metadata.folder.at(-1)]);
  if (typeof metadata.size === "number") rows.push(["size", `${(metadata.size / 1e6).toFixed(1)} MB`]);
  if (typeof metadata.modified === "string") rows.push(["modified", metadata.modified]);
  const shown = new Set(rows.map(([key]) => (key === "place" ? ["latitude", "longitude"] : [key])).flat());
  return [...rows, ...PHOTO_FIELDS.filter((key) => key in metadata && !shown.has(key)).map((key) => [key, metadata[key]])];
}

function mapUrl(metadata) {
  const [lat, lon] = [metadata.latitude, metadata.longitude];
  return `https://www.openstreetmap.org/?mlat=${lat}&mlon=${lon}#map=15/${lat}/${lon}`;
}

function findSimilar() {
  $("detail").close();
  clearImage();
  $("query").value = "";
  setLike({ id: shown.id, caption: shown.caption || shown.id });
  search();
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

document.addEventListener("DOMContentLoaded", async () => {
  $("search-form").addEventListener("submit", search);
  $("pick-image").addEventListener("click", () => $("image-file").click());
  $("image-file").addEventListener("change", (e) => setImage(e.target.files[0]));
  $("clear-image").addEventListener("click", clearImage);
  $("clear-like").addEventListener("click", () => setLike(null));
  $("find-similar").addEventListener("click", findSimilar);
  $("detail-original").addEventListener("click", openOriginal);
  $("index").addEventListener("change", describeIndex);
  $("api-key").addEventListener("change", (e) => { sessionStorage.setItem("stair-api-key", e.target.value); loadInfo(); });
  window.addEventListener("popstate", () => { clearImage(); if (stateFromUrl()) search(null, true); });
  setUpDragAndDrop();
  await loadInfo();
  if (stateFromUrl()) search(null, true);
});
