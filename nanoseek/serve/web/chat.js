// The chat page: streams /v1/chat/completions (SSE over fetch) and shows the reasoning collapsed.
// Plain browser JavaScript, no build step and no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} of the conversation so far (reasoning is not sent back)
let controller = null;  // the AbortController of the request in flight

$("api-key").value = localStorage.getItem("nanoseek-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("nanoseek-api-key", $("api-key").value);
  loadModels();
});

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "Content-Type": "application/json", Authorization: `Bearer ${key}` }
             : { "Content-Type": "application/json" };
}

function setStatus(text) { $("status").textContent = text; }

async function errorMessage(response) {
  try { return (await response.json()).error.message; } catch { return `HTTP ${response.status}`; }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { setStatus(await errorMessage(response)); return; }
  const select = $("model");
  const previous = select.value;
  select.replaceChildren();
  for (const model of (await response.json()).data) {
    const option = new Option(`${model.id} (${model.state})`, model.id);
    option.dataset.thinking = model.thinking;
    select.add(option);
  }
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  syncThinking();
  setStatus("");
}

function syncThinking() {
  const option = $("model").selectedOptions[0];
  if (option) $("thinking").checked = option.dataset.thinking === "true";
}
$("model").addEventListener("change", syncThinking);

function addMessage(role, text) {
  const element = document.createElement("div");
  element.className = `message ${role}`;
  element.textContent = text;
  $("messages").append(element);
  element.scrollIntoView({ block: "end" });
  return element;
}

function assistantMessage() {
  const element = addMessage("assistant", "");
  const reasoning = document.createElement("details");  // collapsed until the reader opens it
  reasoning.className = "reasoning";
  reasoning.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "Reasoning";
  const reasoningText = document.createElement("div");
  reasoningText.className = "reasoning-text";
  reasoning.append(summary, reasoningText);
  const content = document.createElement("div");
  content.className = "content";
  element.append(reasoning, content);
  element.dataset.chunks = "0";
  return { element, reasoning, reasoningText, content };
}

// Yields the JSON payloads of an SSE body as they arrive; stops at [DONE].
async function* serverEvents(response) {
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
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;  // SSE comments are keep-alives
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = assistantMessage();
  controller = new AbortController();
  $("send").hidden = true;
  $("stop").hidden = false;
  setStatus("generating…");
  const body = {
    model: $("model").value,
    messages: history,
    stream: true,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
    chat_template_kwargs: { thinking: $("thinking").checked },
  };
  let finish = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of serverEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (choice.delta.reasoning_content) {
        reply.reasoning.hidden = false;
        reply.reasoningText.textContent += choice.delta.reasoning_content;
      }
      if (choice.delta.content) reply.content.textContent += choice.delta.content;
      if (choice.finish_reason) finish = choice.finish_reason;
      reply.element.dataset.chunks = String(Number(reply.element.dataset.chunks) + 1);
      reply.element.scrollIntoView({ block: "end" });
    }
    history.push({ role: "assistant", content: reply.content.textContent });
    setStatus("");
  } catch (error) {
    history.pop();  // the turn did not complete: it is not part of the conversation
    if (error.name === "AbortError") {
      finish = "stopped";
      setStatus("");
    } else {
      reply.element.classList.add("error");
      reply.content.textContent += (reply.content.textContent ? "\n" : "") + error.message;
      setStatus(error.message);
    }
  } finally {
    if (finish && finish !== "stop") {  // length, content filter, stopped by the reader
      const note = document.createElement("div");
      note.className = "finish";
      note.textContent = `(${finish.replace("_", " ")})`;
      reply.element.append(note);
    }
    reply.element.dataset.finishReason = finish;
    reply.element.dataset.done = "true";
    controller = null;
    $("send").hidden = false;
    $("stop").hidden = true;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren();
});

loadModels();
