// gpt-serve's page: sends the conversation to this server's OpenAI API with stream: true and
// logprobs, and draws each streamed token as a span shaded by its probability; hovering over (or
// tapping) a token shows the model's top alternatives at that step, as `python -m gpt explain`
// prints them. No framework and no build step: plain DOM calls, text set through textContent only
// (what the model writes is never read as markup).
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["mode", "max_tokens", "temperature", "top_p", "top_k", "top_logprobs", "stop",
                  "seed", "api_key"];
const history = [];  // the chat so far: {role, content}
let controller = null;  // aborts the answer being streamed (the server then frees its sequence)

// A probability as a colour: red where the model found the token unlikely, green where it was sure.
function shade(p) {
  return `hsl(${Math.round(130 * Math.max(0, Math.min(1, p)))}, 75%, 82%)`;
}

function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("api_key").value) h.Authorization = `Bearer ${$("api_key").value}`;
  return h;
}

function visible(text) {  // whitespace made visible in the tooltip
  return text.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5") || "\u2205";
}

function loadSettings() {
  for (const name of SETTINGS) {
    const saved = localStorage.getItem(`gpt-serve.${name}`);
    if (saved !== null && name !== "api_key") $(name).value = saved;
    $(name).addEventListener("change", () => localStorage.setItem(`gpt-serve.${name}`,
                                                                  $(name).value));
  }
  for (const swatch of document.querySelectorAll(".swatch")) {
    swatch.style.background = shade(Number(swatch.dataset.p));
  }
}

async function showModel() {
  try {
    const response = await fetch("/v1/models", {headers: headers()});
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    $("model").textContent = `model: ${body.data[0].id}`;
  } catch (error) {
    $("model").textContent = `model: unknown (${error.message})`;
  }
}

// The request body from the settings; the page always asks for log-probabilities.
function requestBody(prompt) {
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const body = {
    model: $("model").textContent.replace(/^model: /, ""),
    stream: true,
    stream_options: {include_usage: true},
    max_tokens: number("max_tokens"),
    temperature: number("temperature"),
    top_p: number("top_p"),
    top_k: number("top_k") ? number("top_k") : undefined,
    seed: number("seed"),
  };
  const stop = $("stop").value.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
  if (stop) body.stop = [stop];
  const top = Math.max(0, Math.min(20, number("top_logprobs") || 0));
  if ($("mode").value === "chat") {
    body.messages = [...history, {role: "user", content: prompt}];
    body.logprobs = true;
    body.top_logprobs = top;
  } else {
    body.prompt = prompt;
    body.logprobs = top;
  }
  return body;
}

function addMessage(kind, text) {
  const div = document.createElement("div");
  div.className = `message ${kind}`;
  if (text) div.textContent = text;
  $("chat").appendChild(div);
  $("hint").hidden = true;
  return div;
}

// One token: its text, shaded by p = exp(logprob); its alternatives kept for the tooltip.
function addToken(message, text, logprob, alternatives) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  if (logprob !== null && logprob !== undefined) {
    const p = Math.exp(logprob);
    span.dataset.p = String(p);
    span.dataset.logprob = String(logprob);
    span.style.background = shade(p);
    span.alternatives = alternatives;
    span.addEventListener("mouseenter", () => showTip(span));
    span.addEventListener("mouseleave", hideTip);
    span.addEventListener("click", (event) => { event.stopPropagation(); showTip(span); });
  }
  message.body.appendChild(span);
  $("chat").scrollTop = $("chat").scrollHeight;
}

function showTip(span) {
  const tip = $("tip");
  tip.replaceChildren();
  const head = document.createElement("div");
  head.className = "head";
  const p = Number(span.dataset.p);
  head.textContent = `"${visible(span.textContent)}"  p = ${(100 * p).toFixed(2)}%  ` +
                     `(log p ${Number(span.dataset.logprob).toFixed(3)})`;
  tip.appendChild(head);
  const table = document.createElement("table");
  for (const [token, logprob] of span.alternatives) {
    const row = table.insertRow();
    if (token === span.textContent) row.className = "chosen";
    row.insertCell().textContent = visible(token);
    const cell = row.insertCell();
    cell.className = "p";
    cell.textContent = `${(100 * Math.exp(logprob)).toFixed(2)}%`;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(1, Math.round(60 * Math.exp(logprob)))}px`;
    row.insertCell().appendChild(bar);
  }
  if (span.alternatives.length) tip.appendChild(table);
  const box = span.getBoundingClientRect();
  tip.hidden = false;
  const left = Math.min(box.left, window.innerWidth - tip.offsetWidth - 8);
  const below = box.bottom + 6 + tip.offsetHeight < window.innerHeight;
  tip.style.left = `${Math.max(4, left)}px`;
  tip.style.top = `${below ? box.bottom + 6 : box.top - tip.offsetHeight - 6}px`;
  document.querySelectorAll(".tok.active").forEach((t) => t.classList.remove("active"));
  span.classList.add("active");
}

function hideTip() {
  $("tip").hidden = true;
  document.querySelectorAll(".tok.active").forEach((t) => t.classList.remove("active"));
}

// Server-sent events from a fetch body: yields each `data:` payload, parsed, until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// What one chunk adds: [text, logprob, [[token, logprob], ...]] in either API's layout.
function tokenOf(chunk, chat) {
  const choice = chunk.choices[0];
  if (chat) {
    const entry = choice.logprobs && choice.logprobs.content[0];
    const text = choice.delta.content;
    if (text === undefined || (text === "" && !entry)) return null;
    return [text, entry ? entry.logprob : null,
            entry ? entry.top_logprobs.map((t) => [t.token, t.logprob]) : []];
  }
  const lp = choice.logprobs;
  if (!choice.text && !(lp && lp.tokens.length)) return null;
  const alternatives = lp && lp.top_logprobs[0] ? Object.entries(lp.top_logprobs[0]) : [];
  alternatives.sort((a, b) => b[1] - a[1]);
  return [choice.text, lp && lp.tokens.length ? lp.token_logprobs[0] : null, alternatives];
}

async function send(prompt) {
  const chat = $("mode").value === "chat";
  addMessage("user", prompt);
  const message = addMessage("assistant", "");
  message.body = message;
  if (!chat) {
    const shown = document.createElement("span");
    shown.className = "prompt";
    shown.textContent = prompt;
    message.appendChild(shown);
  }
  controller = new AbortController();
  $("send").disabled = true;
  $("stop_button").disabled = false;
  const started = performance.now();
  let first = null, tokens = 0, answer = "", finish = "", usage = null;
  try {
    const response = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(prompt)),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      if (!chunk.choices.length) continue;
      if (chunk.choices[0].finish_reason) finish = chunk.choices[0].finish_reason;
      const token = tokenOf(chunk, chat);
      if (token === null) continue;
      first = first === null ? performance.now() : first;
      tokens += 1;
      answer += token[0];
      addToken(message, ...token);
    }
  } catch (error) {
    if (error.name !== "AbortError") {
      addMessage("assistant error", error.message);
    }
    finish = finish || (error.name === "AbortError" ? "stopped" : "error");
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop_button").disabled = true;
  }
  if (chat && finish !== "error") {
    history.push({role: "user", content: prompt}, {role: "assistant", content: answer});
  }
  const meta = document.createElement("span");
  meta.className = "meta";
  const seconds = (performance.now() - (first || started)) / 1000;
  meta.textContent = [
    `${usage ? usage.completion_tokens : tokens} tokens`,
    `finish: ${finish || "?"}`,
    first === null ? null : `first token after ${Math.round(first - started)} ms`,
    tokens > 1 ? `${((tokens - 1) / seconds).toFixed(1)} tokens/s` : null,
  ].filter(Boolean).join(" \u00b7 ");
  message.appendChild(meta);
  message.classList.add("done");
}

function main() {
  loadSettings();
  showModel();
  $("api_key").addEventListener("change", showModel);
  $("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    const prompt = $("prompt").value;
    if (!prompt.trim() || controller) return;
    $("prompt").value = "";
    send(prompt);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("stop_button").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => {
    history.length = 0;
    document.querySelectorAll(".message").forEach((m) => m.remove());
    $("hint").hidden = false;
  });
  document.addEventListener("click", hideTip);
}

main();
