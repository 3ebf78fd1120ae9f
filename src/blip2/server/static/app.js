// The BLIP-2 web page: plain JS, no build step. Captions go to /v1/caption (multipart upload); the chat goes to
// /v1/chat/completions with the whole history each time, as OpenAI clients do (the server keeps no session).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, dataUrl: null, history: [] }; // history: [{question, answer}]

const keyInput = $("api-key");
keyInput.value = localStorage.getItem("blip2-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("blip2-api-key", keyInput.value));

function authHeaders() {
  const key = keyInput.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// Only the options the user set reach the server; sampling knobs only when sampling is on.
function generationOptions() {
  const opts = {};
  const maxTokens = parseInt($("max-tokens").value, 10);
  const beams = parseInt($("num-beams").value, 10);
  if (maxTokens > 0) opts.max_tokens = maxTokens;
  if (beams > 1) opts.num_beams = beams;
  opts.do_sample = $("do-sample").checked;
  if (opts.do_sample) {
    const t = parseFloat($("temperature").value);
    const p = parseFloat($("top-p").value);
    if (t > 0) opts.temperature = t;
    if (p > 0 && p <= 1) opts.top_p = p;
  }
  return opts;
}

// fetch + JSON + timing; a non-2xx answer throws with the server's own error message.
async function callApi(url, init) {
  const started = performance.now();
  let response;
  try {
    response = await fetch(url, { ...init, headers: { ...authHeaders(), ...(init.headers || {}) } });
  } catch (err) {
    throw new Error(`cannot reach the server (${err.message})`);
  }
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON: reported below */ }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    throw new Error(`${response.status}: ${message}`);
  }
  return { body, seconds: (performance.now() - started) / 1000 };
}

function setBusy(busy) {
  document.body.classList.toggle("busy", busy);
  $("caption-btn").disabled = busy || !state.file;
  $("ask-btn").disabled = busy || !state.file;
}

function resetChat() {
  state.history = [];
  $("chat-log").replaceChildren();
}

function setImage(file) {
  if (!file) return;
  state.file = file;
  $("file-name").textContent = `${file.name} (${Math.round(file.size / 1024)} KB)`;
  const preview = $("preview");
  const reader = new FileReader();
  reader.onload = () => {
    state.dataUrl = reader.result;
    preview.src = reader.result;
    preview.hidden = false;
  };
  reader.readAsDataURL(file);
  // The browser may not display a file the server can read, or the reverse: the server has the last word.
  preview.onerror = () => { preview.hidden = true; };
  resetChat();
  $("caption-result").querySelector(".text").textContent = "";
  $("caption-result").querySelector(".time").textContent = "";
  showError("");
  setBusy(false);
}

async function caption() {
  const form = new FormData();
  form.append("file", state.file, state.file.name);
  const prompt = $("caption-prompt").value.trim();
  if (prompt) form.append("prompt", prompt);
  for (const [key, value] of Object.entries(generationOptions())) form.append(key, String(value));
  setBusy(true);
  try {
    const { body, seconds } = await callApi("/v1/caption", { method: "POST", body: form });
    $("caption-result").querySelector(".text").textContent = body.text;
    $("caption-result").querySelector(".time").textContent = `(${seconds.toFixed(2)} s)`;
    showError("");
  } catch (err) {
    showError(err.message);
  } finally {
    setBusy(false);
  }
}

function chatMessages(question) {
  const turns = [...state.history, { question, answer: null }];
  const messages = [];
  turns.forEach((turn, i) => {
    const content = [{ type: "text", text: turn.question }];
    if (i === 0) content.unshift({ type: "image_url", image_url: { url: state.dataUrl } });
    messages.push({ role: "user", content });
    if (turn.answer !== null) messages.push({ role: "assistant", content: turn.answer });
  });
  return messages;
}

function addLine(kind, text, seconds) {
  const li = document.createElement("li");
  li.className = kind;
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  li.append(span);
  if (seconds !== undefined) {
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = ` (${seconds.toFixed(2)} s)`;
    li.append(time);
  }
  $("chat-log").append(li);
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || !state.dataUrl) return;
  const payload = { messages: chatMessages(question), ...generationOptions() };
  setBusy(true);
  try {
    const { body, seconds } = await callApi("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload),
    });
    const answer = body.choices[0].message.content;
    state.history.push({ question, answer });
    addLine("user", question);
    addLine("answer", answer, seconds);
    $("question").value = "";
    showError("");
  } catch (err) {
    showError(err.message);
  } finally {
    setBusy(false);
  }
}

const drop = $("drop");
["dragenter", "dragover"].forEach((name) => drop.addEventListener(name, (e) => {
  e.preventDefault();
  drop.classList.add("over");
}));
["dragleave", "drop"].forEach((name) => drop.addEventListener(name, () => drop.classList.remove("over")));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  setImage(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", (e) => setImage(e.target.files[0]));
$("caption-btn").addEventListener("click", caption);
$("ask-form").addEventListener("submit", ask);
$("reset-btn").addEventListener("click", resetChat);

fetch("/healthz").then((r) => r.json()).then((h) => { $("model-name").textContent = h.model || ""; }).catch(() => {});
