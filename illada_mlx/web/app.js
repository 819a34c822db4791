// The web chat page of `illada-mlx serve`. It sends the whole conversation to /v1/chat/completions as a
// stream with diffusion.steps, draws the block being denoised (the canvas) from the step chunks, and
// appends each block's text to the reply when its content chunk arrives. Stop aborts the fetch; the
// server cancels the generation at the step it is on. With a JSON schema set, the request asks for
// response_format json_schema: the canvas is the schema's template, its fixed text drawn dimmed.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "illada-mlx-api-key";  // localStorage: the API key, asked for once on a 401
const NUMBERS = ["threshold", "block_length", "steps_per_block", "max_tokens", "temperature"];

let defaults = null;  // GET /v1/illada/defaults: {model, mode, modes: {name: {block_length, ...}}, end_tokens}
let conversation = [];  // the conversation, sent whole with every request: [{role, content}]
let running = null;  // the AbortController of the reply being written
window.illadaSteps = 0;  // step chunks drawn so far (the browser test reads it)

// ------------------------------------------------------------------------------------------ the API
async function api(path, options = {}) {
  // fetch with the stored API key; a 401 shows the key form, waits for a key and tries again
  for (;;) {
    const headers = { ...(options.headers || {}) };
    const key = localStorage.getItem(KEY);
    if (key) headers["Authorization"] = "Bearer " + key;
    const r = await fetch(path, { ...options, headers });
    if (r.status !== 401) return r;
    await askKey(key ? "The server refused that key. Its API key:" : "This server needs its API key (--api-key):");
  }
}

function askKey(message) {
  return new Promise((resolve) => {
    const form = $("key");
    $("key-message").textContent = message;
    form.hidden = false;
    $("key-input").focus();
    form.onsubmit = (e) => {
      e.preventDefault();
      localStorage.setItem(KEY, $("key-input").value.trim());
      $("key-input").value = "";
      form.hidden = true;
      resolve();
    };
  });
}

async function* chunks(response) {
  // the JSON objects of a server-sent event stream, up to [DONE]
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function errorText(r) {
  try {
    return (await r.json()).error.message;
  } catch {
    return `HTTP ${r.status}`;
  }
}

// ------------------------------------------------------------------------------------------ settings
async function loadDefaults() {
  const r = await api("/v1/illada/defaults");
  if (!r.ok) {
    status("cannot read the model's settings: " + (await errorText(r)));
    return;
  }
  defaults = await r.json();
  $("model").textContent = defaults.model;
  for (const name of Object.keys(defaults.modes)) $("mode").append(new Option(name, name));
  $("mode").value = defaults.mode;
  fillDefaults();
  $("send").disabled = false;
}

function fillDefaults() {
  const d = defaults.modes[$("mode").value];
  for (const f of NUMBERS) $(f).value = d[f];
  $("threshold").disabled = d.rule !== "threshold";
  $("block_refresh").value = d.block_refresh;
  $("block_refresh").disabled = d.cache === "none";  // only a cached mode recomputes at a block start
}

function requestBody() {
  // the conversation and the settings that differ from the mode's defaults
  const d = defaults.modes[$("mode").value];
  const diffusion = { steps: true, mode: $("mode").value };
  const body = { messages: conversation, stream: true, diffusion };
  for (const f of NUMBERS) {
    const raw = $(f).value.trim();
    if (raw === "" || Number(raw) === d[f] || $(f).disabled) continue;
    if (f === "max_tokens" || f === "temperature") body[f] = Number(raw);
    else diffusion[f] = Number(raw);
  }
  if (!$("block_refresh").disabled && $("block_refresh").value !== d.block_refresh) {
    diffusion.block_refresh = $("block_refresh").value;
  }
  const schema = readSchema();
  if (schema) body.response_format = { type: "json_schema", json_schema: { name: "page", schema } };
  return body;
}

// ------------------------------------------------------------------------------------------ the JSON schema
function readSchema() {
  // the schema box: null when empty, else its object; throws an Error saying what is wrong
  const raw = $("schema").value.trim();
  if (!raw) return null;
  let value;
  try {
    value = JSON.parse(raw);
  } catch (e) {
    throw new Error("not JSON: " + e.message);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new Error("a JSON schema is an object: {\"type\": ...}");
  }
  return value;
}

function checkSchema() {
  // whether the schema box can be sent; its error shown under it (text only), its state in the summary
  let error = "", set = false;
  try {
    set = readSchema() !== null;
  } catch (e) {
    error = e.message;
  }
  $("schema-error").textContent = error;
  $("schema-error").hidden = !error;
  $("schema").classList.toggle("invalid", !!error);
  $("schema-state").textContent = error ? "(invalid)" : set ? "(on)" : "";
  return !error;
}

// ------------------------------------------------------------------------------------------ the canvas
function visible(piece) {
  // a token's text as a canvas cell shows it: spaces and newlines made visible
  return piece === "" ? "\u2205" : piece.replace(/\n/g, "\u21b5").replace(/ /g, "\u2423");
}

class Canvas {
  // the reply's current block: a cell per position, a mask until the step that commits it
  constructor(parent) {
    this.el = document.createElement("div");
    this.el.className = "canvas";
    parent.append(this.el);
    this.block = null;
    this.cells = [];
  }

  step(ev) {
    if (ev.block !== this.block) {
      this.block = ev.block;
      this.el.replaceChildren();
      this.cells = [];
      for (let j = 0; j < ev.length; j++) {
        const cell = document.createElement("span");
        cell.className = "cell mask";
        cell.textContent = "\u00b7";
        this.el.append(cell);
        this.cells.push(cell);
      }
    }
    for (const cell of this.el.querySelectorAll(".new")) cell.classList.remove("new");
    for (const [pos, , piece] of ev.fixed || []) {  // a JSON template's text, written before denoising
      const cell = this.cells[pos - ev.start];
      cell.className = "cell fixed";
      cell.textContent = visible(piece);
      cell.title = piece;
    }
    for (const [pos, id, piece] of ev.commits) {
      const cell = this.cells[pos - ev.start];
      const end = defaults.end_tokens.includes(id);  // EOS / EoT: the reply ends at the first one
      cell.className = end ? "cell end new" : "cell new";
      cell.textContent = end ? "EOS" : visible(piece);
      cell.title = piece;
    }
    this.el.hidden = false;
    window.illadaSteps += 1;
  }

  blockDone() {
    this.el.hidden = true;  // its text is in the reply now; the next block's first step shows it again
  }
}

// ------------------------------------------------------------------------------------------ the chat
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.append(body);
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function statsLine(stats, settings, finish) {
  if (!stats) return finish;
  const parts = [`${stats.output_tokens} tokens`, `${stats.tokens_per_s.toFixed(1)} tokens/s`,
    `${stats.nfe} forwards`, `${stats.tokens_per_forward.toFixed(2)} tokens/forward`, settings.mode];
  if (finish !== "stop") parts.push(finish);
  return parts.join(" · ");
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  const question = addMessage("user", text);
  const msg = addMessage("assistant", "");
  msg.classList.add("writing");
  const body = msg.querySelector(".text");
  const canvas = new Canvas(msg);
  const info = document.createElement("div");
  info.className = "stats";
  msg.append(info);
  running = new AbortController();
  busy(true);
  let reply = "", finish = null, stats = null, settings = null, failed = null;
  try {
    const r = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()), signal: running.signal,
    });
    if (!r.ok) throw new Error(await errorText(r));
    for await (const c of chunks(r)) {
      if (c.error) throw new Error(c.error.message);
      if (c.diffusion) canvas.step(c.diffusion);
      const choice = c.choices[0];
      if (!choice) continue;
      if (choice.delta.content) {
        reply += choice.delta.content;
        body.textContent = reply;
        canvas.blockDone();
      }
      if (choice.finish_reason) {
        finish = choice.finish_reason;
        stats = c.diffusion_stats;
        settings = c.diffusion_settings;
      }
    }
  } catch (e) {
    failed = e.name === "AbortError" ? "stopped" : "error: " + e.message;
  }
  canvas.el.remove();
  msg.classList.remove("writing");
  info.textContent = failed || statsLine(stats, settings, finish);
  if (failed) msg.classList.add("failed");
  // a reply that produced text stays in the conversation (stopped too); a question stopped before any text
  // stays too (it is on the page, so it is sent); a failure without text leaves its question out, and says so
  if (reply) conversation.push({ role: "assistant", content: reply });
  else if (failed !== "stopped") {
    conversation.pop();
    question.classList.add("dropped");
    info.textContent += " (the question is left out of the conversation)";
  }
  running = null;
  busy(false);
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("new-chat").disabled = on;
}

function status(text) {
  $("status").textContent = text;
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || running || !defaults) return;
  if (!checkSchema()) {  // the question stays in the box until the schema is fixed or cleared
    $("json").open = true;
    $("schema").focus();
    return;
  }
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("ask").requestSubmit();
  }
});
$("stop").addEventListener("click", () => running && running.abort());
$("new-chat").addEventListener("click", () => {
  conversation = [];
  $("log").replaceChildren();
});
$("schema").addEventListener("input", checkSchema);
$("schema-example").addEventListener("click", () => {
  $("schema").value = $("schema").placeholder;
  checkSchema();
});
$("mode").addEventListener("change", fillDefaults);
$("defaults").addEventListener("click", fillDefaults);
$("send").disabled = true;
loadDefaults();
