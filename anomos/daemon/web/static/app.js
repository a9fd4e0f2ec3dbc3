// The anomos daemon's web page: vanilla JavaScript, no outside code.
// Actions go through the Transmission RPC (with its session-id handshake); the
// list and the neighbourhood follow the server-sent events of /web/events.
// Every text from the daemon (torrent and file names come from strangers) enters
// the page as textContent or an attribute value, never as HTML.
"use strict";

const RPC_URL = "/transmission/rpc";
const EVENTS_URL = "/web/events";
const MAX_ATORRENT = 8 * 1024 * 1024; // anomos.torrent.metainfo.MAX_METAINFO_SIZE
const SVG_NS = "http://www.w3.org/2000/svg";
const STATUS = ["Stopped", "Check wait", "Verifying", "Queued", "Downloading", "Queued", "Seeding"];

let sessionId = "";
let detailId = null;
let detailTimer = null;
let detailFiles = [];

// ---------------------------------------------------------------- helpers

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function size(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function rate(n) { return n > 0 ? `${size(n)}/s` : "–"; }

function eta(seconds, left) {
  if (left === 0) return "done";
  if (seconds < 0) return "–";
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  return h ? `${h} h ${m} min` : m ? `${m} min ${s} s` : `${s} s`;
}

function say(text, isError) {
  const message = $("message");
  message.textContent = text;
  message.className = isError ? "error" : "";
}

// ---------------------------------------------------------------- the RPC

async function rpc(method, args) {
  const body = JSON.stringify({ method: method, arguments: args || {} });
  for (let attempt = 0; attempt < 2; attempt++) {
    const response = await fetch(RPC_URL, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Transmission-Session-Id": sessionId },
      body: body,
      credentials: "same-origin",
    });
    if (response.status === 409) {
      sessionId = response.headers.get("X-Transmission-Session-Id") || "";
      continue;
    }
    let reply;
    try { reply = await response.json(); } catch (e) { reply = null; }
    if (!response.ok) {
      throw new Error(`HTTP ${response.status}${reply && reply.result ? ": " + reply.result : ""}`);
    }
    if (!reply || reply.result !== "success") {
      throw new Error(reply && typeof reply.result === "string" ? reply.result : "no answer");
    }
    return reply.arguments || {};
  }
  throw new Error("the session-id handshake did not settle");
}

async function act(what, method, args) {
  try {
    const result = await rpc(method, args);
    say(what, false);
    return result;
  } catch (e) {
    say(`${method}: ${e.message}`, true);
    return null;
  }
}

// ---------------------------------------------------------------- adding

function added(reply) {
  if (!reply) return;
  const t = reply["torrent-added"] || reply["torrent-duplicate"];
  const how = reply["torrent-added"] ? "added" : "already there";
  if (t) say(`${how}: ${t.name}`, false);
}

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => {
      const url = String(reader.result);
      resolve(url.slice(url.indexOf(",") + 1)); // a data: URL; its payload is base64
    };
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

$("add-file").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) { say("choose an .atorrent file first", true); return; }
  if (file.size > MAX_ATORRENT) { say(`${file.name}: larger than ${size(MAX_ATORRENT)}`, true); return; }
  let metainfo;
  try { metainfo = await readBase64(file); } catch (e) { say(`cannot read ${file.name}: ${e}`, true); return; }
  const reply = await act("", "torrent-add", { metainfo: metainfo, paused: $("add-paused").checked });
  added(reply);
  if (reply) $("file").value = "";
});

$("add-magnet").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("magnet").value.trim();
  if (!text) { say("paste a magnet link first", true); return; }
  const reply = await act("", "torrent-add", { filename: text, paused: $("add-paused").checked });
  added(reply);
  if (reply) $("magnet").value = "";
});

// ---------------------------------------------------------------- the list

function circuitsText(c) {
  if (!c) return "–";
  const built = Object.entries(c["ended-by-relays"] || {})
    .sort((a, b) => Number(a[0]) - Number(b[0]))
    .map(([relays, n]) => `${n}×${relays}r`);
  return `${c.open} open` + (built.length ? `; ${built.join(" ")}` : "");
}

// One row per torrent, made once and updated in place by each event (a button under
// the pointer or with the focus stays the same element).
const rows = new Map();

function makeRow(id) {
  const r = { torrent: null };
  r.tr = el("tr", { id: `torrent-${id}` });
  r.nameButton = el("button", { type: "button", class: "open-detail" });
  r.nameButton.addEventListener("click", () => openDetail(id));
  r.errorLine = el("div", { class: "error-line" });
  r.progress = el("progress", { max: 1, value: 0 });
  r.percent = document.createTextNode("");
  r.toggle = el("button", { type: "button" });
  r.toggle.addEventListener("click", () => {
    const t = r.torrent, running = t.status !== 0;
    act(running ? `paused ${t.name}` : `resumed ${t.name}`, running ? "torrent-stop" : "torrent-start", { ids: [t.id] });
  });
  const remove = el("button", { type: "button", class: "remove" }, "Remove");
  remove.addEventListener("click", () => {
    const t = r.torrent;
    if (window.confirm(`Remove ${t.name} from the daemon (its files stay)?`)) {
      act(`removed ${t.name}`, "torrent-remove", { ids: [t.id] });
    }
  });
  r.cells = {};
  for (const key of ["id", "state", "down", "up", "eta", "ratio", "circuits"]) r.cells[key] = el("td", { class: key });
  r.tr.append(
    r.cells.id,
    el("td", { class: "name" }, r.nameButton, r.errorLine),
    r.cells.state,
    el("td", { class: "done" }, r.progress, r.percent),
    r.cells.down, r.cells.up, r.cells.eta, r.cells.ratio, r.cells.circuits,
    el("td", { class: "actions" }, r.toggle, remove),
  );
  return r;
}

function updateRow(r, t) {
  r.torrent = t;
  r.tr.dataset.status = t.status;
  r.tr.dataset.percent = t.percentDone;
  r.tr.className = t.error ? "error" : "";
  r.cells.id.textContent = t.id;
  r.nameButton.textContent = t.name;
  r.errorLine.textContent = t.error ? t.errorString : "";
  r.cells.state.textContent = t.error ? `Error (${STATUS[t.status] || "?"})` : STATUS[t.status] || "?";
  r.progress.value = t.percentDone;
  r.percent.textContent = ` ${Math.floor(t.percentDone * 1000) / 10}%`;
  r.cells.down.textContent = rate(t.rateDownload);
  r.cells.up.textContent = rate(t.rateUpload);
  r.cells.eta.textContent = eta(t.eta, t.leftUntilDone);
  r.cells.ratio.textContent = t.uploadRatio < 0 ? "–" : t.uploadRatio.toFixed(2);
  r.cells.ratio.title = `up ${size(t.uploadedEver)}, down ${size(t.downloadedEver)}`;
  r.cells.circuits.textContent = circuitsText(t["anomos-circuits"]);
  const running = t.status !== 0;
  r.toggle.textContent = running ? "Pause" : "Resume";
  r.toggle.className = running ? "pause" : "resume";
}

function showTorrents(torrents) {
  const seen = new Set();
  const body = $("torrent-rows");
  torrents.forEach((t, i) => {
    seen.add(t.id);
    if (!rows.has(t.id)) rows.set(t.id, makeRow(t.id));
    const r = rows.get(t.id);
    updateRow(r, t);
    if (body.children[i] !== r.tr) body.insertBefore(r.tr, body.children[i] || null); // (daemon's order)
  });
  for (const [id, r] of rows) {
    if (!seen.has(id)) { r.tr.remove(); rows.delete(id); }
  }
  $("empty").hidden = torrents.length > 0;
  if (detailId !== null && !seen.has(detailId)) closeDetail();
}

function showSession(s) {
  const account = s["anomos-account"];
  const ratio = s["anomos-ratio"];
  const parts = [
    `↓ ${rate(s.downloadSpeed)}`,
    `↑ ${rate(s.uploadSpeed)}`,
    `relayed ${size(s["anomos-relayed"] || 0)}`,
  ];
  if (ratio !== null && ratio !== undefined) parts.push(`share ratio with relay credit ${Number(ratio).toFixed(2)}`);
  if (account) parts.push(`credited relaying ${size(account.relayed)} of ${size(account["relayed-claimed"])}`);
  parts.push(`${s["anomos-neighbours"] || 0} neighbours`);
  $("totals").textContent = parts.join(" · ");
}

// ---------------------------------------------------------------- detail and files

async function openDetail(id) {
  detailId = id;
  $("detail").hidden = false;
  await refreshDetail(true);
  clearInterval(detailTimer);
  detailTimer = setInterval(() => refreshDetail(false), 2000);
}

function closeDetail() {
  detailId = null;
  clearInterval(detailTimer);
  $("detail").hidden = true;
}

async function refreshDetail(redrawFiles) {
  if (detailId === null) return;
  const fields = ["id", "name", "hashString", "downloadDir", "status", "sizeWhenDone", "leftUntilDone",
    "uploadedEver", "downloadedEver", "uploadRatio", "addedDate", "doneDate", "peersConnected",
    "errorString", "files", "fileStats", "anomos-circuits"];
  let reply;
  try { reply = await rpc("torrent-get", { ids: [detailId], fields: fields }); } catch (e) { say(`torrent-get: ${e.message}`, true); return; }
  const t = (reply.torrents || [])[0];
  if (!t) { closeDetail(); return; }
  $("detail-name").textContent = t.name;
  const c = t["anomos-circuits"] || {};
  const facts = [
    ["infohash", t.hashString],
    ["folder", t.downloadDir],
    ["state", STATUS[t.status] || "?"],
    ["size", size(t.sizeWhenDone)],
    ["left", size(t.leftUntilDone)],
    ["uploaded / downloaded", `${size(t.uploadedEver)} / ${size(t.downloadedEver)}`],
    ["ratio", t.uploadRatio < 0 ? "–" : t.uploadRatio.toFixed(2)],
    ["circuits open", c.open || 0],
    ["circuits built, by relays", Object.entries(c["ended-by-relays"] || {}).map(([r, n]) => `${r} relays: ${n}`).join(", ") || "–"],
    ["circuits failed", c.failed || 0],
    ["added", t.addedDate ? new Date(t.addedDate * 1000).toLocaleString() : "–"],
    ["finished", t.doneDate ? new Date(t.doneDate * 1000).toLocaleString() : "–"],
  ];
  if (t.errorString) facts.push(["error", t.errorString]);
  $("detail-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const same = detailFiles.length === t.files.length;
  if (redrawFiles || !same) {
    detailFiles = t.files.map((f, i) => ({ name: f.name, wanted: t.fileStats[i] ? t.fileStats[i].wanted : true }));
    $("file-rows").replaceChildren(...t.files.map((f, i) => {
      const box = el("input", { type: "checkbox", class: "wanted", "data-index": i });
      box.checked = detailFiles[i].wanted;
      return el("tr", {}, el("td", {}, box), el("td", { class: "name" }, f.name), el("td", {}, size(f.length)),
        el("td", { class: "file-done" }, `${Math.floor((f.bytesCompleted / (f.length || 1)) * 100)}%`));
    }));
  } else {
    const cells = $("file-rows").querySelectorAll("td.file-done");
    t.files.forEach((f, i) => { cells[i].textContent = `${Math.floor((f.bytesCompleted / (f.length || 1)) * 100)}%`; });
  }
}

$("apply-files").addEventListener("click", () => {
  if (detailId === null) return;
  const wanted = [], unwanted = [];
  $("file-rows").querySelectorAll("input.wanted").forEach((box) => {
    (box.checked ? wanted : unwanted).push(Number(box.dataset.index));
  });
  const args = { ids: [detailId] };
  if (wanted.length) args["files-wanted"] = wanted;
  if (unwanted.length) args["files-unwanted"] = unwanted;
  act("file selection applied", "torrent-set", args).then((ok) => { if (ok) refreshDetail(true); });
});

$("close-detail").addEventListener("click", closeDetail);

// ---------------------------------------------------------------- the neighbourhood

function showNeighbourhood(n) {
  const picture = $("neighbourhood");
  const width = 640, height = 420, cx = width / 2, cy = height / 2;
  const rx = width / 2 - 95, ry = height / 2 - 55; // an ellipse: room for labels
  const rows = n.neighbours || [];
  const most = Math.max(1, ...rows.map((r) => r.relayed));
  const links = [], nodes = [];
  rows.forEach((r, i) => {
    const angle = (2 * Math.PI * i) / Math.max(rows.length, 1) - Math.PI / 2;
    const x = cx + rx * Math.cos(angle), y = cy + ry * Math.sin(angle);
    const widthOf = 1.5 + 8 * Math.sqrt(r.relayed / most);
    links.push(svg("line", { class: r.linked ? "link" : "link down", x1: cx, y1: cy, x2: x, y2: y, "stroke-width": widthOf }));
    const mx = cx + (x - cx) * 0.55, my = cy + (y - cy) * 0.55 - (Math.abs(y - cy) < 40 ? 12 : 0);
    links.push(svg("text", { class: "bytes", x: mx, y: my }, r.linked ? `relayed ${size(r.relayed)} of ${size(r.sent + r.received)}` : "no link"));
    const node = svg("g", { class: r.linked ? "node" : "node down", "data-nid": r.nid, "data-relayed": r.relayed, "data-bytes": r.sent + r.received });
    const title = svg("title", {}, `NID ${r.nid} (${r.tracker}): relayed ${size(r.relayed)}; all bytes sent ${size(r.sent)}, received ${size(r.received)}`);
    const below = y >= cy ? 32 : -32; // the label outside the ring
    node.append(title, svg("circle", { cx: x, cy: y, r: 18 }), svg("text", { class: "nid", x: x, y: y + below }, `NID ${r.nid}`));
    nodes.push(node);
  });
  const me = svg("g", { class: "self" });
  me.append(svg("circle", { cx: cx, cy: cy, r: 42 }), svg("text", { x: cx, y: cy - 7 }, "this peer"),
    svg("text", { x: cx, y: cy + 9 }, `relayed ${size(n.relayed || 0)}`));
  if (!rows.length) {
    nodes.push(svg("text", { x: cx, y: cy + 60 }, n.identity ? "no neighbours assigned yet" : "not on a tracker yet: add a torrent"));
  }
  picture.replaceChildren(...links, me, ...nodes);
}

// ---------------------------------------------------------------- live events

function connect() {
  const source = new EventSource(EVENTS_URL);
  source.onopen = () => { $("connection").textContent = "live"; $("connection").className = "good"; };
  source.onerror = () => {
    $("connection").textContent = "disconnected: retrying";
    $("connection").className = "bad";
    if (source.readyState === EventSource.CLOSED) setTimeout(connect, 5000); // (refused: 503, ...)
  };
  source.onmessage = (event) => {
    let doc;
    try { doc = JSON.parse(event.data); } catch (e) { return; }
    showTorrents(doc.torrents || []);
    showSession(doc.session || {});
    showNeighbourhood(doc.neighbourhood || {});
  };
}

connect();
