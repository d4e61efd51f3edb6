// The status page: polls v1/mlx/status every 2 s and streams a chat from v1/chat/completions.
"use strict";

const POLL_MS = 2000;
const { element } = MlxPages;

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  return s < 1 ? `${(s * 1000).toFixed(1)} ms` : `${s.toFixed(2)} s`;
}

function duration(s) {
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${Math.floor(s % 60)} s` : `${Math.floor(s)} s`;
}

// rows: [field, label, text] or [field, label, text, node]; each <dd> carries data-field.
function fill(id, rows) {
  const list = document.getElementById(id);
  list.replaceChildren(
    ...rows.flatMap(([field, label, text, extra]) => {
      const value = element("dd", "", text);
      value.dataset.field = field;
      if (extra) value.append(extra);
      return [element("dt", "", label), value];
    }),
  );
}

function meter(value, max) {
  const node = element("meter");
  node.max = max;
  node.value = value;
  node.high = max * 0.9;
  return node;
}

function percentiles(summary) {
  if (!summary || !summary.count) return "no samples";
  return `${seconds(summary.p50)} / ${seconds(summary.p90)} / ${seconds(summary.p99)}`;
}

function quantization(value) {
  if (!value) return "none";
  return typeof value === "string" ? value : JSON.stringify(value);
}

function render(status) {
  const { model, device, engine, counters, latency } = status;
  document.getElementById("model-name").textContent = model.id;
  document.title = `${model.id} · mlx-engine-server`;
  fill("model", [
    ["model_id", "id", model.id],
    ["kind", "kind", model.kind],
    ["context_window", "context window", `${model.context_window.toLocaleString()} tokens`],
    ["quantization", "quantization", quantization(model.quantization)],
    ["adapter", "adapter", model.adapter_path || "none"],
    ["path", "path", model.path || model.resolved_path],
    ["version", "versions", `server ${status.version.server}, mlx ${status.version.mlx}`],
  ]);
  renderDevice(status);
  fill("load", [
    ["requests_active", "running", `${engine.requests_active} of ${engine.max_batch_size}`, meter(engine.requests_active, engine.max_batch_size)],
    ["requests_queued", "queued", `${engine.requests_queued} of ${engine.max_queue}`],
    ["tokens_per_s", "tokens/s", engine.tokens_per_s.toFixed(1)],
    ["distributed", "processes", status.distributed ? `${status.distributed.size} (${status.distributed.backend}, ${status.distributed.mode})` : "one"],
  ]);
  document.getElementById("latency-window").textContent = latency.window_s;
  fill("latency", [
    ["ttft", "first token", percentiles(latency.ttft_s)],
    ["itl", "between tokens", percentiles(latency.itl_s)],
    ["latency_samples", "samples", `${latency.ttft_s.count} first tokens, ${latency.itl_s.count} gaps`],
  ]);
  renderCache(status.prefix_cache);
  fill("totals", [
    ["requests_total", "requests", counters.requests_total.toLocaleString()],
    ["failures_total", "failures", counters.failures_total.toLocaleString()],
    ["prompt_tokens_total", "prompt tokens", counters.prompt_tokens_total.toLocaleString()],
    ["completion_tokens_total", "generated tokens", counters.completion_tokens_total.toLocaleString()],
    ["uptime", "uptime", duration(status.uptime_s)],
  ]);
}

function renderDevice(status) {
  const memory = status.device.memory || {};
  const budget = status.memory_budget;
  const rows = [
    ["device", "device", status.device.name],
    ["memory_active", "in use", bytes(memory.active_bytes)],
    ["memory_peak", "peak", bytes(memory.peak_bytes)],
    ["memory_cache", "MLX cache", bytes(memory.cache_bytes)],
  ];
  if (budget) {
    rows.push(["memory_budget", "budget", bytes(budget.budget_bytes), meter(memory.active_bytes || 0, budget.budget_bytes)]);
    rows.push(["memory_weights", "weights", bytes(budget.weights_bytes)]);
    rows.push(["memory_reserved", "reserved by requests", bytes(budget.reserved_bytes)]);
  }
  fill("device", rows);
}

function renderCache(cache) {
  if (!cache) {
    fill("cache", [["cache_hit_rate", "hit rate", "off"]]);
    return;
  }
  fill("cache", [
    ["cache_hit_rate", "hit rate", `${(cache.hit_rate * 100).toFixed(1)} % (${cache.hits} of ${cache.hits + cache.misses})`],
    ["cache_entries", "entries", String(cache.entries)],
    ["cache_bytes", "size", `${bytes(cache.bytes)} of ${bytes(cache.max_bytes)}`, meter(cache.bytes, cache.max_bytes || 1)],
    ["cache_tokens", "prompt tokens reused", cache.cached_tokens_total.toLocaleString()],
  ]);
}

function setState(text, ok) {
  const badge = document.getElementById("state");
  badge.textContent = text;
  badge.className = `badge ${ok ? "ok" : "bad"}`;
}

let pollTimer = null;

async function poll() {
  clearTimeout(pollTimer);
  try {
    const response = await MlxPages.apiFetch("v1/mlx/status", { cache: "no-store" });
    if (!response.ok) throw new Error(await MlxPages.errorText(response));
    render(await response.json());
    setState("serving", true);
    document.getElementById("updated").textContent = new Date().toLocaleTimeString();
  } catch (error) {
    setState(error.message === "Failed to fetch" ? "unreachable" : error.message, false);
  } finally {
    pollTimer = setTimeout(poll, POLL_MS);
  }
}

// --- chat ---------------------------------------------------------------------------------

const conversation = [];
let running = null; // the AbortController of the answer being streamed

function addMessage(role, text) {
  const node = element("div", `message ${role}`, text);
  document.getElementById("transcript").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

// Server-sent events from a fetch() body: each `data:` line's JSON, until `data: [DONE]`.
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function streamAnswer(answer) {
  const request = {
    messages: conversation,
    stream: true,
    max_tokens: Number(document.getElementById("max-tokens").value) || 128,
    temperature: Number(document.getElementById("temperature").value),
  };
  const response = await MlxPages.apiFetch("v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(request),
    signal: running.signal,
  });
  if (!response.ok) throw new Error(await MlxPages.errorText(response));
  const reasoning = element("span", "reasoning");
  const text = document.createTextNode("");
  answer.replaceChildren(reasoning, text);
  for await (const chunk of sseData(response.body)) {
    if (chunk.error) throw new Error(chunk.error.message);
    const delta = chunk.choices?.[0]?.delta || {};
    if (delta.reasoning_content) reasoning.textContent += delta.reasoning_content;
    if (delta.content) text.textContent += delta.content;
  }
  return text.textContent;
}

async function send(event) {
  event.preventDefault();
  const input = document.getElementById("chat-input");
  const prompt = input.value.trim();
  if (!prompt || running) return;
  input.value = "";
  conversation.push({ role: "user", content: prompt });
  addMessage("user", prompt);
  const answer = addMessage("assistant", "…");
  running = new AbortController();
  setChatBusy(true);
  try {
    conversation.push({ role: "assistant", content: await streamAnswer(answer) });
  } catch (error) {
    conversation.pop(); // the question goes unanswered: send it again
    answer.className = "message error";
    answer.textContent = error.name === "AbortError" ? "stopped" : error.message;
  } finally {
    running = null;
    setChatBusy(false);
    poll();
  }
}

function setChatBusy(busy) {
  document.getElementById("send").disabled = busy;
  document.getElementById("stop").disabled = !busy;
}

function installChat() {
  const input = document.getElementById("chat-input");
  document.getElementById("chat-form").addEventListener("submit", send);
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      document.getElementById("chat-form").requestSubmit();
    }
  });
  document.getElementById("stop").addEventListener("click", () => running?.abort());
  document.getElementById("clear").addEventListener("click", () => {
    running?.abort();
    conversation.length = 0;
    document.getElementById("transcript").replaceChildren();
  });
}

MlxPages.installKeyForm(poll);
installChat();
poll();
