// clipdex web page: plain JS over the REST API, no build step, no dependencies.
// Every piece of data is put into the page with textContent / attributes, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

const view = {
  mode: null,        // "text" | "image" | "similar"
  q: "",             // text query
  file: null,        // Blob of the query image
  fileName: "",
  id: null,          // photo id for "similar"
  k: 40,
  offset: 0,
  results: [],
  current: -1,       // index of the photo open in the viewer
  refine: {},        // filters, cut-off and order: {after, before, in, camera, ...}
  total: null,       // how many passed the cut-off (null: no cut-off)
};

// -- API ------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) {
    await signIn();
    return api(path, options);
  }
  const body = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    const error = (body && body.error) || {};
    throw new ApiError(response.status, error.code || "error",
      error.message || `${response.status} ${response.statusText}`);
  }
  return body;
}

function signIn() {
  const dialog = $("login");
  if (dialog.open) return dialog._pending;
  dialog._pending = new Promise((resolve) => {
    const form = $("login-form");
    form.onsubmit = async (event) => {
      event.preventDefault();
      const response = await fetch("/api/session", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ token: $("token").value }),
      });
      if (response.ok) {
        $("login-error").textContent = "";
        dialog.close();
        resolve();
      } else {
        const body = await response.json().catch(() => null);
        const waited = response.status === 429 && body && body.error;  // too many wrong tokens
        $("login-error").textContent = waited ? body.error.message : "That token is not right.";
      }
    };
    dialog.addEventListener("cancel", (event) => event.preventDefault());
  });
  dialog.showModal();
  $("token").focus();
  return dialog._pending;
}

// -- searching ------------------------------------------------------------------------
function request() {
  if (view.mode === "duplicates") return api(`/api/duplicates?${refineParams(["in"])}`);
  const params = new URLSearchParams({ k: view.k, offset: view.offset });
  for (const [key, value] of refineParams()) params.append(key, value);
  if (view.mode === "text") {
    params.set("q", view.q);
    return api(`/api/search?${params}`);
  }
  if (view.mode === "similar") {
    return api(`/api/images/${view.id}/similar?${params}`);
  }
  const form = new FormData();
  form.append("file", view.file, view.fileName || "image");
  return api(`/api/search/image?${params}`, { method: "POST", body: form });
}

async function run({ focusResults = false } = {}) {
  showError("");
  $("welcome").hidden = true;
  setBusy(true);
  try {
    const answer = await request();
    view.results = answer.groups ? flattenGroups(answer.groups) : answer.results;
    view.total = answer.groups ? answer.groups.length : (answer.total ?? null);
    render();
    if (focusResults) focusCard(0);
  } catch (error) {
    view.results = [];
    render();
    showError(error.message);
  } finally {
    setBusy(false);
  }
}

function searchText(q) {
  Object.assign(view, { mode: "text", q, offset: 0, file: null, id: null });
  writeHash();
  return run();
}

function searchSimilar(id) {
  Object.assign(view, { mode: "similar", id, offset: 0, file: null });
  writeHash();
  return run({ focusResults: true });
}

function searchImage(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name} does not look like an image.`);
    return;
  }
  Object.assign(view, { mode: "image", file, fileName: file.name || "image", offset: 0, id: null });
  writeHash();
  return run({ focusResults: true });
}

// -- rendering ------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

// A file name's undecodable bytes arrive as lone surrogates U+DC80..U+DCFF (lossless JSON,
// as the CLI's --json); show them as \xNN, as the CLI's tables do.
const readable = (path) => path.replace(/[\uDC80-\uDCFF]/gu,
  (c) => `\\x${(c.charCodeAt(0) - 0xDC00).toString(16).padStart(2, "0")}`);
const baseName = (path) => readable(path.split(/[\\/]/).pop());
const formatScore = (score) => score.toFixed(3);
// A moment in a video as m:ss.s (or h:mm:ss).
function formatTime(seconds) {
  const whole = Math.floor(seconds);
  const h = Math.floor(whole / 3600), m = Math.floor((whole % 3600) / 60);
  const s = (seconds - h * 3600 - m * 60).toFixed(1).padStart(4, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${s.padStart(4, "0")}` : `${m}:${s}`;
}
const isVideo = (result) => result.kind === "video";

function card(result, index) {
  const name = baseName(result.path);
  const img = el("img", {
    src: result.thumbnail_url, alt: name, loading: "lazy", decoding: "async",
  });
  const thumb = el("button", {
    type: "button",
    class: "thumb",
    title: `${name}\nscore ${formatScore(result.score)}`,
    "aria-label": `${name}, score ${formatScore(result.score)}`,
    "data-index": index,
    onclick: () => openViewer(index),
  }, img, el("span", { class: "score", text: formatScore(result.score) }));
  if (result.keeper) thumb.append(el("span", { class: "badge", text: "keep" }));
  if (isVideo(result) && result.frame_time != null) {
    thumb.append(el("span", { class: "moment", text: `▶ ${formatTime(result.frame_time)}` }));
    thumb.title += `\nvideo, best moment at ${formatTime(result.frame_time)}`;
  }
  const tags = (result.tags || []).map((tag) => tag.label).join(", ");
  const similar = el("button", {
    type: "button",
    class: "similar",
    "aria-label": `More like ${name}`,
    text: "More like this",
    onclick: () => searchSimilar(result.id),
  });
  const bar = el("div", { class: "card-bar" }, el("span", { class: "name", title: readable(result.path), text: name }));
  if (result.raw) {  // a RAW+JPEG pair shown once: link the RAW's original file
    const rawName = baseName(result.raw.path);
    bar.append(el("a", {
      class: "raw", href: result.raw.image_url, title: `RAW of the same shot: ${readable(result.raw.path)}`,
      text: "+RAW", "aria-label": `RAW file ${rawName}`,
    }));
  }
  if (tags) bar.append(el("span", { class: "tags", title: tags, text: tags }));
  const words = matchedWords(result.matched);
  if (words) bar.append(el("span", { class: "words", title: `matched ${words}`, text: words }));
  bar.append(similar);
  const classes = ["card", result.keeper ? "keeper" : "", result.group % 2 ? "group-odd" : ""];
  return el("li", { class: classes.join(" ").trim(), "data-id": result.id }, thumb, bar);
}

// -- why a result matched (searches that also read words) -------------------------------
const SOURCE_LABELS = {
  name: "File name", folder: "Folder", ocr: "Text in photo", description: "Caption",
  keywords: "Keywords",
};

function matchedWords(matched) {
  if (!matched || !matched.text.length) return "";
  return `${matched.text.join(", ")} (${matched.sources.join(", ")})`;
}

// A snippet with the matched words between [[ and ]] as nodes, those words in <mark>
// (text nodes only: a photo's text is never parsed as HTML).
function marked(text) {
  return text.split(/\[\[|\]\]/).map((part, i) =>
    (i % 2 ? el("mark", { text: part }) : document.createTextNode(part)));
}

function matchedRows(matched) {
  if (!matched) return [];
  const rows = [];
  if (matched.semantic != null) {
    rows.push(el("dt", { text: "Meaning" }), el("dd", { text: `cosine ${formatScore(matched.semantic)}` }));
  }
  if (matched.text.length) {
    rows.push(el("dt", { text: "Words" }), el("dd", { class: "matched-words", text: matchedWords(matched) }));
  }
  for (const snippet of matched.snippets || []) {
    rows.push(el("dt", { text: SOURCE_LABELS[snippet.source] || snippet.source }),
      el("dd", { class: "snippet" }, ...marked(snippet.text)));
  }
  return rows;
}

function render() {
  $("results").replaceChildren(...view.results.map(card));
  renderSummary();
  const page = Math.floor(view.offset / view.k) + 1;
  $("pager").hidden = view.results.length === 0 && view.offset === 0;
  $("prev").disabled = view.offset === 0;
  $("next").disabled = view.mode === "duplicates" || view.results.length < view.k ||
    (view.total != null && view.offset + view.results.length >= view.total);
  $("page-label").textContent = `Page ${page}`;
}

function renderSummary() {
  const summary = $("summary");
  const count = view.results.length;
  const first = view.offset + 1;
  const range = count ? `${first}–${view.offset + count}` : "no";
  const parts = [];
  if (view.mode === "text") {
    parts.push(`Photos ${range} for `, el("strong", { text: `“${view.q}”` }));
  } else if (view.mode === "similar") {
    parts.push(`Photos ${range} like photo `, el("strong", { text: `#${view.id}` }));
  } else if (view.mode === "image") {
    const preview = el("img", { alt: "", src: URL.createObjectURL(view.file) });
    preview.addEventListener("load", () => URL.revokeObjectURL(preview.src), { once: true });
    parts.push(preview, `Photos ${range} like `, el("strong", { text: view.fileName }));
  } else if (view.mode === "duplicates") {
    parts.push(`${view.total} group(s) of near-duplicates, ${count} photos; the suggested keeper is marked`);
  }
  if (view.total != null && view.mode !== "duplicates") parts.push(` · ${view.total} clear matches`);
  const active = refineParams().toString();
  if (active) parts.push(el("span", { class: "refined", text: ` · ${active.replaceAll("&", ", ")}` }));
  summary.replaceChildren(...parts);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setBusy(busy) {
  document.body.toggleAttribute("aria-busy", busy);
}

// -- keyboard navigation in the grid ----------------------------------------------------
function focusCard(index) {
  const thumbs = $("results").querySelectorAll(".thumb");
  if (thumbs.length) thumbs[Math.max(0, Math.min(index, thumbs.length - 1))].focus();
}

function columns() {
  const grid = $("results");
  const cards = grid.children;
  if (cards.length < 2) return 1;
  const top = cards[0].offsetTop;
  let count = 0;
  while (count < cards.length && cards[count].offsetTop === top) count++;
  return count;
}

function onGridKey(event) {
  const target = event.target.closest(".thumb, .similar");
  if (!target) return;
  const index = Number(target.closest(".card").querySelector(".thumb").dataset.index);
  const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns(), ArrowUp: -columns() }[event.key];
  if (step) {
    event.preventDefault();
    focusCard(index + step);
  } else if (event.key === "m" || event.key === "M") {
    event.preventDefault();
    searchSimilar(view.results[index].id);
  }
}

// -- the viewer -------------------------------------------------------------------------
const META_FIELDS = [
  ["path", "Path"], ["size", "File size"], ["dimensions", "Pixels"], ["format", "Format"],
  ["taken_at", "Taken"], ["camera", "Camera"], ["gps", "Location"], ["indexed_at", "Indexed"],
  ["id", "Photo id"], ["tags", "Tags"], ["raw", "RAW file"], ["duration", "Duration"],
  ["codec", "Codec"],
];

function describe(meta) {
  const camera = [meta.camera_make, meta.camera_model].filter(Boolean).join(" ");
  return {
    path: readable(meta.path),
    size: meta.size != null ? `${(meta.size / 1e6).toFixed(2)} MB` : "",
    dimensions: `${meta.width} × ${meta.height}`,
    format: meta.format || "",
    taken_at: meta.taken_at ? meta.taken_at.replace("T", " ") : "",
    camera,
    gps: meta.gps_lat != null ? `${meta.gps_lat.toFixed(5)}, ${meta.gps_lon.toFixed(5)}` : "",
    indexed_at: meta.indexed_at ? meta.indexed_at.replace("T", " ").slice(0, 19) : "",
    id: String(meta.id),
    duration: meta.duration != null ? formatTime(meta.duration) : "",
    codec: meta.codec || "",
  };
}

async function openViewer(index) {
  const result = view.results[index];
  if (!result) return;
  view.current = index;
  const dialog = $("viewer");
  showMedia(result);
  $("viewer-title").textContent = baseName(result.path);
  $("viewer-score").textContent = `score ${formatScore(result.score)} · #${index + 1 + view.offset}`;
  $("viewer-open").href = result.image_url;
  $("viewer-prev").disabled = index === 0;
  $("viewer-next").disabled = index === view.results.length - 1;
  $("viewer-meta").replaceChildren(...matchedRows(result.matched));
  $("viewer-classify").disabled = false;
  if (!dialog.open) dialog.showModal();
  try {
    const facts = describe(await api(`/api/images/${result.id}`));
    facts.tags = (result.tags || []).map((t) => `${t.label} ${(t.score * 100).toFixed(0)}%`).join(", ");
    facts.raw = result.raw ? readable(result.raw.path) : "";
    const rows = META_FIELDS.filter(([key]) => facts[key])
      .flatMap(([key, label]) => [el("dt", { text: label }), el("dd", { text: facts[key] })]);
    if (view.current !== index) return;  // another photo was opened meanwhile
    $("viewer-meta").replaceChildren(...matchedRows(result.matched), ...rows);
  } catch (error) {
    $("viewer-meta").replaceChildren(el("dd", { class: "error", text: error.message }));
  }
}

// A photo shows as a large thumbnail; a video plays from its best moment (the file is
// served with range requests, so the browser fetches only what it plays).
function showMedia(result) {
  const img = $("viewer-img"), video = $("viewer-video");
  video.pause();
  img.hidden = isVideo(result);
  video.hidden = !isVideo(result);
  if (isVideo(result)) {
    img.removeAttribute("src");
    video.src = `${result.image_url}#t=${result.frame_time || 0}`;
    video.poster = result.thumbnail_url.replace("size=256", "size=1024");
  } else {
    video.removeAttribute("src");
    video.load();
    img.src = `/api/images/${result.id}/thumbnail?size=1024`;
    img.alt = baseName(result.path);
  }
}

function closeViewer() {
  $("viewer-video").pause();
  const dialog = $("viewer");
  if (dialog.open) dialog.close();
}

function onViewerKey(event) {
  if (event.key === "ArrowRight" && view.current < view.results.length - 1) openViewer(view.current + 1);
  else if (event.key === "ArrowLeft" && view.current > 0) openViewer(view.current - 1);
  else if (event.key === "m" || event.key === "M") viewerSimilar();
  else return;
  event.preventDefault();
}

function viewerSimilar() {
  const result = view.results[view.current];
  closeViewer();
  if (result) searchSimilar(result.id);
}

// -- URL state (back / forward work for text and similar searches) -------------------------
function writeHash() {
  const params = new URLSearchParams();
  if (view.mode === "text") params.set("q", view.q);
  if (view.mode === "similar") params.set("similar", view.id);
  if (view.mode === "image") params.set("image", view.fileName);
  if (view.mode === "duplicates") params.set("duplicates", "1");
  params.set("k", view.k);
  if (view.offset) params.set("offset", view.offset);
  for (const [key, value] of refineParams()) params.append(`f.${key}`, value);
  const hash = `#${params}`;
  if (location.hash !== hash) history.pushState(null, "", hash);
}

function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const k = Number(params.get("k"));
  if ([20, 40, 80, 200].includes(k)) view.k = k;
  $("k").value = String(view.k);
  view.offset = Math.max(0, Number(params.get("offset")) || 0);
  readRefine(params);
  if (params.has("duplicates")) {
    view.mode = "duplicates";
    return run();
  }
  if (params.has("q")) {
    Object.assign(view, { mode: "text", q: params.get("q") });
    $("q").value = view.q;
    return run();
  }
  if (params.has("similar") && /^\d+$/.test(params.get("similar"))) {
    Object.assign(view, { mode: "similar", id: Number(params.get("similar")) });
    return run();
  }
  if (params.has("image") && view.file) return run();
  return null;
}

// -- status line --------------------------------------------------------------------------
let statusTimer = null;

async function refreshStatus() {
  clearTimeout(statusTimer);
  let delay = 30000;
  try {
    const info = await api("/api/info");
    const [state, text] = statusText(info);
    $("status").dataset.state = state;
    $("status-text").textContent = text;
    if (state === "busy") delay = 2000;
    else if (info.sync) delay = 5000;  // the watched folders change the library by themselves
  } catch (error) {
    $("status").dataset.state = "error";
    $("status-text").textContent = `Server unreachable: ${error.message}`;
    delay = 5000;
  }
  statusTimer = setTimeout(refreshStatus, delay);
}

function statusText(info) {
  if (info.library_state === "failed") return ["error", info.errors.library];
  if (info.model_state === "failed") return ["error", info.errors.model];
  if (!info.ready) return ["busy", "Loading the library and the model…"];
  const photos = `${info.images.toLocaleString()} photos`;
  const model = info.model || info.encoder || "no model yet";
  const running = info.jobs.find((job) => job.state === "running");
  const sync = syncText(info.sync);
  if (running) {
    const total = running.total == null ? "?" : running.total.toLocaleString();
    return ["busy", `${photos} · indexing ${running.done.toLocaleString()} / ${total}` +
      ` (${running.img_per_s} img/s, ${running.failed} failed) · ${model}${sync}`];
  }
  const queued = info.jobs.length ? ` · ${info.jobs.length} index job(s) queued` : "";
  const syncing = info.sync && info.sync.state === "indexing";
  return [syncing ? "busy" : "ready", `${photos} · ${model} · ready${queued}${sync}`];
}

// `serve --watch`: what the sync of the watched folders is doing, and its last batch.
function syncText(sync) {
  if (!sync) return "";
  if (sync.state === "failed") return ` · sync stopped: ${sync.error}`;
  const count = sync.paths.length;
  const folders = count === 1 ? "1 folder" : `${count} folders`;
  const doing = {
    starting: `starting to watch ${folders}`,
    watching: `watching ${folders}`,
    polling: `rescanning ${folders} every ${sync.poll_seconds} s`,
    indexing: `syncing ${folders}…`,
    waiting: "sync waiting for another writer",
    "waiting for folders": `waiting for ${folders} to come back`,
  }[sync.state] || `sync ${sync.state}`;
  let text = ` · ${doing}`;
  if (sync.missing && sync.missing.length) text += ` (${sync.missing.length} missing)`;
  if (sync.pending) text += `, ${sync.pending.toLocaleString()} pending`;
  const last = sync.last_batch;
  if (last) {
    const at = new Date(last.finished_at * 1000).toLocaleTimeString();
    text += `, last batch ${at}: +${(last.indexed + last.reused).toLocaleString()}` +
      ` −${last.removed.toLocaleString()}` + (last.failed ? `, ${last.failed} failed` : "");
  }
  return text;
}

// -- drag and drop, paste -------------------------------------------------------------------
function setUpDrop() {
  let depth = 0;
  const overlay = $("drop-overlay");
  const hasFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");
  window.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth++;
    overlay.hidden = false;
  });
  window.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) overlay.hidden = true;
  });
  window.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  window.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    depth = 0;
    overlay.hidden = true;
    searchImage(event.dataTransfer.files[0]);
  });
  window.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) searchImage(file);
  });
}

// -- wiring -----------------------------------------------------------------------------------
function wire() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const q = $("q").value.trim();
    if (q) searchText(q);
  });
  $("k").addEventListener("change", () => {
    view.k = Number($("k").value);
    view.offset = 0;
    if (view.mode) {
      writeHash();
      run();
    }
  });
  $("pick-image").addEventListener("click", () => $("image-input").click());
  $("image-input").addEventListener("change", (event) => {
    searchImage(event.target.files[0]);
    event.target.value = "";
  });
  $("prev").addEventListener("click", () => page(-1));
  $("next").addEventListener("click", () => page(1));
  $("results").addEventListener("keydown", onGridKey);
  $("viewer").addEventListener("keydown", onViewerKey);
  $("viewer").addEventListener("close", () => focusCard(view.current));
  $("viewer").addEventListener("click", (event) => {
    if (event.target === $("viewer")) closeViewer();  // click on the backdrop
  });
  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer-prev").addEventListener("click", () => openViewer(view.current - 1));
  $("viewer-next").addEventListener("click", () => openViewer(view.current + 1));
  $("viewer-similar").addEventListener("click", viewerSimilar);
  wireRefine();
  document.addEventListener("keydown", (event) => {
    const typing = /^(INPUT|SELECT|TEXTAREA)$/.test(document.activeElement?.tagName || "");
    if (event.key === "/" && !typing && !$("viewer").open) {
      event.preventDefault();
      $("q").focus();
      $("q").select();
    }
  });
  window.addEventListener("popstate", readHash);
  setUpDrop();
}

function page(direction) {
  view.offset = Math.max(0, view.offset + direction * view.k);
  writeHash();
  run({ focusResults: true });
}

// -- refinements: filters, cut-off, order, duplicates, classification ------------------------
const REFINE_FIELDS = {
  after: "f-after", before: "f-before", in: "f-in", camera: "f-camera",
  min_size: "f-min-size", format: "f-format", tag: "f-tag", sort: "f-sort",
};

function readRefineForm() {
  const refine = {};
  for (const [key, id] of Object.entries(REFINE_FIELDS)) {
    const value = $(id).value.trim();
    if (value && !(key === "sort" && value === "score")) refine[key] = value;
  }
  if ($("f-cutoff").checked) refine.cutoff = "auto";
  if ($("f-raw-pairs").checked) refine.raw_pairs = "true";
  return refine;
}

function refineParams(only = null) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(view.refine)) {
    if (!only || only.includes(key)) params.set(key, value);
  }
  return params;
}

function readRefine(params) {
  view.refine = {};
  for (const [key, value] of params) {
    if (key.startsWith("f.")) view.refine[key.slice(2)] = value;
  }
  for (const [key, id] of Object.entries(REFINE_FIELDS)) {
    const value = view.refine[key] || (key === "sort" ? "score" : "");
    if (key === "tag" && value && ![...$(id).options].some((o) => o.value === value)) {
      $(id).append(el("option", { value, text: value }));
    }
    $(id).value = value;
  }
  $("f-cutoff").checked = view.refine.cutoff === "auto";
  $("f-raw-pairs").checked = view.refine.raw_pairs === "true";
}

function applyRefine() {
  view.refine = readRefineForm();
  view.offset = 0;
  if (!view.mode) return;
  writeHash();
  run();
}

function flattenGroups(groups) {
  return groups.flatMap((group, number) => group.members.map((member) => (
    { ...member, group: number, keeper: member.id === group.keeper })));
}

function findDuplicates() {
  view.refine = readRefineForm();
  Object.assign(view, { mode: "duplicates", offset: 0, file: null, id: null });
  writeHash();
  return run({ focusResults: true });
}

async function loadTags() {
  try {
    const { tags } = await api("/api/tags");
    const select = $("f-tag");
    const known = new Set([...select.options].map((o) => o.value));
    for (const tag of tags) {
      if (!known.has(tag.label)) select.append(el("option", { value: tag.label, text: `${tag.label} (${tag.images})` }));
    }
  } catch (error) {
    // Tags are optional (an untagged library offers none); retry while the server starts.
    if (error.status === 503) setTimeout(loadTags, 3000);
  }
}

async function viewerClassify() {
  const result = view.results[view.current];
  if (!result) return;
  $("viewer-classify").disabled = true;
  const form = new FormData();
  form.append("id", result.id);
  const note = el("dd", { class: "pending", text: "…" });
  $("viewer-meta").append(el("dt", { text: "Looks like" }), note);
  for (;;) {
    try {
      const answer = await api("/api/classify", { method: "POST", body: form });
      note.textContent = answer.predictions
        .map((p) => `${p.label} ${(p.probability * 100).toFixed(0)}%`).join(", ");
      note.className = "classified";
      return;
    } catch (error) {
      // The first use of the labels with this model prepares them once (503 preparing):
      // show how far it got and ask again.
      note.textContent = error.message;
      if (error.code !== "preparing") {
        note.className = "error";
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }
}

function wireRefine() {
  // Capture phase: runs before the search form's own handler, so a search uses the fields.
  $("search-form").addEventListener("submit", () => { view.refine = readRefineForm(); }, true);
  $("f-apply").addEventListener("click", applyRefine);
  $("f-clear").addEventListener("click", () => {
    readRefine(new URLSearchParams());
    applyRefine();
  });
  $("refine").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && event.target.tagName === "INPUT") {
      event.preventDefault();
      applyRefine();
    }
  });
  $("find-duplicates").addEventListener("click", findDuplicates);
  $("viewer-classify").addEventListener("click", viewerClassify);
}

wire();
refreshStatus();
loadTags();
readHash();
