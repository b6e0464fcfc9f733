// The chat page of `main.py serve`: it talks to this server's /v1 API and shows the model's text as text.
// No element is ever built from the model's text as HTML: Markdown is parsed here into DOM nodes whose
// text is set with textContent, and links keep only http(s) addresses.
"use strict";

const TEXTS = {
  zh: {
    new_chat: "新对话", temperature: "温度", top_p: "Top-p", max_tokens: "最大生成长度",
    history_rounds: "历史对话轮次", thinking: "思考", tool_select: "工具（最多4个）", send: "发送", stop: "停止",
    placeholder: "给 MiniMind 发送消息", disclaimer: "AI 生成内容可能存在错误，请仔细核实",
    greeting: "我是 {name}，有什么可以帮你的？", thought: "思考过程", thinking_now: "思考中…",
    copy: "复制", copied: "已复制", regenerate: "重新生成", tool_called: "工具调用", stopped: "（已停止）",
    params: "参数", unlimited: "不限",
  },
  en: {
    new_chat: "New chat", temperature: "Temperature", top_p: "Top-p", max_tokens: "Max tokens",
    history_rounds: "History rounds", thinking: "Thinking", tool_select: "Tools (at most 4)", send: "Send",
    stop: "Stop", placeholder: "Send a message to MiniMind", disclaimer: "AI-generated content may be inaccurate, please verify",
    greeting: "I am {name}, how can I help you?", thought: "Thoughts", thinking_now: "Thinking…", copy: "Copy",
    copied: "Copied", regenerate: "Regenerate", tool_called: "Tool called", stopped: "(stopped)", params: "parameters",
    unlimited: "no limit",
  },
};
const TOOL_LABELS = {
  calculate_math: ["数学", "Math"], get_current_time: ["时间", "Time"], random_number: ["随机", "Random"],
  text_length: ["字数", "Length"], unit_converter: ["单位", "Units"], get_current_weather: ["天气", "Weather"],
  get_exchange_rate: ["汇率", "Exchange"], translate_text: ["翻译", "Translate"],
};
const MAX_TOOLS = 4; // web_demo's limit
const MAX_TOOL_ROUNDS = 8;
// web_demo's system prompt when no tool is offered
const SYSTEM_PROMPT = "你是MiniMind，一个乐于助人、知识渊博的AI助手。请用完整且友好的方式回答用户问题。";

const state = {
  lang: localStorage.getItem("minimind-lang") || (navigator.language.startsWith("zh") ? "zh" : "en"),
  model: null, tools: [], turns: [], controller: null,
};
const $ = (id) => document.getElementById(id);
const t = (key) => TEXTS[state.lang][key];

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---- Markdown into DOM nodes ------------------------------------------------------------------------

const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([\s\S]+?)\*\*|__([\s\S]+?)__|~~([\s\S]+?)~~|\*([^*\s](?:[^*]*[^*\s])?)\*|\[([^\]\n]+)\]\(([^)\s]+)\)/g;

function renderInline(text, parent) {
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    parent.append(text.slice(last, match.index));
    last = match.index + match[0].length;
    const [, ticks, code, strong, strong2, strike, emphasis, label, href] = match;
    if (ticks) {
      parent.append(element("code", null, code));
    } else if (strong || strong2) {
      renderInline(strong || strong2, parent.appendChild(element("strong")));
    } else if (strike) {
      renderInline(strike, parent.appendChild(element("del")));
    } else if (emphasis) {
      renderInline(emphasis, parent.appendChild(element("em")));
    } else if (/^https?:\/\//i.test(href)) {
      const link = element("a", null, label);
      link.href = href;
      link.rel = "noopener noreferrer";
      link.target = "_blank";
      parent.append(link);
    } else {
      parent.append(match[0]);
    }
  }
  parent.append(text.slice(last));
}

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
const LIST_ITEM = /^\s*([-*+]|\d+[.)])\s+(.*)$/;
const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
const TABLE_ROW = /^\s*\|.*\|\s*$/;
const TABLE_RULE = /^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/;

function tableCells(line) {
  return line.trim().replace(/^\||\|$/g, "").split("|").map((cell) => cell.trim());
}

function startsBlock(line, next) {
  return FENCE.test(line) || HEADING.test(line) || LIST_ITEM.test(line) || /^\s*>/.test(line) || RULE.test(line)
    || (TABLE_ROW.test(line) && next !== undefined && TABLE_RULE.test(next));
}

function renderMarkdown(text, parent) {
  parent.replaceChildren();
  const lines = text.split("\n");
  for (let i = 0; i < lines.length;) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
      i++;
      const code = element("code", null, body.join("\n"));
      if (fence[2]) code.dataset.language = fence[2];
      parent.appendChild(element("pre")).append(code);
      continue;
    }
    const heading = line.match(HEADING);
    if (heading) {
      renderInline(heading[2], parent.appendChild(element(`h${heading[1].length + 2 > 6 ? 6 : heading[1].length + 2}`)));
      i++;
      continue;
    }
    if (RULE.test(line)) {
      parent.append(element("hr"));
      i++;
      continue;
    }
    if (LIST_ITEM.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = parent.appendChild(element(ordered ? "ol" : "ul"));
      for (; i < lines.length && LIST_ITEM.test(lines[i]); i++) {
        renderInline(lines[i].match(LIST_ITEM)[2], list.appendChild(element("li")));
      }
      continue;
    }
    if (/^\s*>/.test(line)) {
      const quoted = [];
      for (; i < lines.length && /^\s*>/.test(lines[i]); i++) quoted.push(lines[i].replace(/^\s*>\s?/, ""));
      renderMarkdown(quoted.join("\n"), parent.appendChild(element("blockquote")));
      continue;
    }
    if (TABLE_ROW.test(line) && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])) {
      const table = parent.appendChild(element("table"));
      const head = table.appendChild(element("thead")).appendChild(element("tr"));
      for (const cell of tableCells(line)) renderInline(cell, head.appendChild(element("th")));
      const body = table.appendChild(element("tbody"));
      for (i += 2; i < lines.length && TABLE_ROW.test(lines[i]); i++) {
        const row = body.appendChild(element("tr"));
        for (const cell of tableCells(lines[i])) renderInline(cell, row.appendChild(element("td")));
      }
      continue;
    }
    if (!line.trim()) {
      i++;
      continue;
    }
    const paragraph = parent.appendChild(element("p"));
    for (let first = true; i < lines.length && lines[i].trim() && (first || !startsBlock(lines[i], lines[i + 1])); i++) {
      if (!first) paragraph.append(element("br"));
      renderInline(lines[i], paragraph);
      first = false;
    }
  }
}

// ---- Replies ----------------------------------------------------------------------------------------

// What the answer shows: tool calls appear as cards (their JSON is hidden, finished or not) and a <think>
// block the model wrote itself joins the reasoning.
function splitShown(content) {
  let reasoning = "";
  let shown = content.replace(/<think>([\s\S]*?)<\/think>/g, (_, thought) => { reasoning += thought.trim(); return ""; });
  shown = shown.replace(/<tool_call>[\s\S]*?<\/tool_call>/g, "").replace(/<tool_call>[\s\S]*$/, "");
  return { reasoning, shown: shown.trim() };
}

class AssistantTurn {
  constructor(userTurn) {
    this.userTurn = userTurn;
    this.messages = []; // the API messages of this turn: tool rounds, then the answer
    this.node = element("div", "turn assistant");
    this.body = this.node.appendChild(element("div", "body"));
    this.actions = this.node.appendChild(element("div", "actions"));
  }

  // One round's views: a thinking fold (open while it streams) and the answer.
  newRound() {
    this.thinking = element("details", "thinking");
    this.thinking.append(element("summary", null, t("thinking_now")), element("div", "reasoning"));
    this.thinking.hidden = true;
    this.answer = element("div", "answer");
    this.body.append(this.thinking, this.answer);
    this.reasoning = "";
    this.content = "";
  }

  show() {
    const { reasoning, shown } = splitShown(this.content);
    const thought = [this.reasoning.trim(), reasoning].filter(Boolean).join("\n");
    if (thought) {
      this.thinking.hidden = false;
      this.thinking.querySelector(".reasoning").textContent = thought;
      const streamingThought = this.streaming && !shown;
      this.thinking.querySelector("summary").textContent = streamingThought ? t("thinking_now") : t("thought");
      if (streamingThought !== this.thinkingWasOpen) this.thinking.open = streamingThought;
      this.thinkingWasOpen = streamingThought;
    }
    renderMarkdown(shown, this.answer);
  }

  showToolCall(name, argumentsText, result) {
    const card = this.body.appendChild(element("div", "tool-call"));
    card.append(element("div", "label", t("tool_called")));
    const line = card.appendChild(element("div"));
    line.append(element("b", null, name), "(", element("code", null, argumentsText), ") → ", element("code", null, result));
  }

  showError(message) {
    this.body.append(element("p", "error", message));
  }

  // The text a copy takes: every round's answer.
  text() {
    return this.messages.filter((m) => m.role === "assistant").map((m) => splitShown(m.content).shown)
      .filter(Boolean).join("\n\n");
  }
}

async function apiError(response) {
  try {
    const body = await response.json();
    return body.error?.message || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// Streams one completion into the turn's current round; returns {finish, toolCalls}.
async function streamRound(turn, messages, signal) {
  const settings = readSettings();
  const request = { model: state.model?.id, messages, stream: true, temperature: settings.temperature, top_p: settings.top_p };
  if (settings.max_tokens < Number($("max_tokens").max)) request.max_tokens = settings.max_tokens;
  if (settings.tools.length) request.tools = settings.tools;
  if (settings.thinking) request.open_thinking = true;
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request), signal,
  });
  if (!response.ok) throw new Error(await apiError(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  const toolCalls = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") return { finish, toolCalls };
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        turn.reasoning += delta.reasoning_content || "";
        turn.content += delta.content || "";
        toolCalls.push(...(delta.tool_calls || []));
        finish = choice.finish_reason || finish;
      }
      turn.show();
    }
  }
  return { finish, toolCalls };
}

function historyMessages(upTo) {
  // The last `history_rounds` turns before the new question (web_demo's history), with their tool rounds
  const rounds = readSettings().history_rounds;
  const earlier = state.turns.slice(0, upTo).slice(rounds ? -rounds : state.turns.length);
  return earlier.flatMap((turn) => (turn instanceof AssistantTurn ? turn.messages : [{ role: "user", content: turn.content }]));
}

async function answer(userIndex) {
  const userTurn = state.turns[userIndex];
  const turn = new AssistantTurn(userTurn);
  state.turns.splice(userIndex + 1, 0, turn);
  $("messages").append(turn.node);
  const controller = new AbortController();
  setBusy(controller);
  const settings = readSettings();
  const system = settings.tools.length ? [] : [{ role: "system", content: SYSTEM_PROMPT }];
  const prefix = [...system, ...historyMessages(userIndex), { role: "user", content: userTurn.content }];
  try {
    for (let round = 0; round < MAX_TOOL_ROUNDS; round++) {
      turn.newRound();
      turn.streaming = true;
      const { finish, toolCalls } = await streamRound(turn, [...prefix, ...turn.messages], controller.signal);
      turn.streaming = false;
      turn.show();
      const { shown } = splitShown(turn.content);
      const message = { role: "assistant", content: shown };
      if (turn.reasoning) message.reasoning_content = turn.reasoning.trim();
      if (finish !== "tool_calls" || !toolCalls.length) {
        turn.messages.push(message);
        break;
      }
      turn.messages.push({ ...message, tool_calls: toolCalls.map(({ id, type, function: call }) => ({ id, type, function: call })) });
      for (const call of toolCalls) {
        const response = await fetch("/v1/tools/call", {
          method: "POST", headers: { "Content-Type": "application/json" }, signal: controller.signal,
          body: JSON.stringify({ name: call.function.name, arguments: call.function.arguments }),
        });
        if (!response.ok) throw new Error(await apiError(response));
        const { content } = await response.json();
        turn.showToolCall(call.function.name, call.function.arguments, content);
        turn.messages.push({ role: "tool", tool_call_id: call.id, content });
      }
    }
  } catch (error) {
    turn.streaming = false;
    if (error.name === "AbortError") {
      turn.show();
      turn.messages.push({ role: "assistant", content: splitShown(turn.content).shown });
      turn.body.append(element("span", "stopped", t("stopped")));
    } else {
      turn.showError(error.message);
    }
  } finally {
    setBusy(null);
    addActions(turn);
  }
}

function addActions(turn) {
  turn.actions.replaceChildren();
  const copy = turn.actions.appendChild(element("button", "copy", t("copy")));
  copy.type = "button";
  copy.addEventListener("click", async () => {
    await copyText(turn.text());
    copy.textContent = t("copied");
    setTimeout(() => { copy.textContent = t("copy"); }, 1200);
  });
  if (state.turns[state.turns.length - 1] === turn) {
    const again = turn.actions.appendChild(element("button", "regenerate", t("regenerate")));
    again.type = "button";
    again.addEventListener("click", () => regenerate(turn));
  }
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = document.body.appendChild(element("textarea"));
    area.value = text;
    area.select();
    document.execCommand("copy");
    area.remove();
  }
}

function regenerate(turn) {
  if (state.controller) return;
  const index = state.turns.indexOf(turn);
  state.turns.splice(index, 1);
  turn.node.remove();
  answer(index - 1);
}

function ask(text) {
  const userTurn = { content: text, node: element("div", "turn user") };
  userTurn.node.append(element("div", "bubble", text));
  for (const turn of state.turns) if (turn instanceof AssistantTurn) turn.actions.querySelector(".regenerate")?.remove();
  state.turns.push(userTurn);
  $("messages").append(userTurn.node);
  answer(state.turns.length - 1);
}

function newChat() {
  state.controller?.abort();
  state.turns = [];
  $("messages").replaceChildren($("greeting"));
}

function setBusy(controller) {
  state.controller = controller;
  $("send").hidden = Boolean(controller);
  $("stop").hidden = !controller;
  document.body.dataset.busy = controller ? "true" : "false";
}

// ---- Settings ---------------------------------------------------------------------------------------

function readSettings() {
  const value = (id) => Number($(id).value);
  const chosen = [...document.querySelectorAll("#tools input:checked")].map((box) => box.value);
  return {
    temperature: value("temperature"), top_p: value("top_p"), max_tokens: value("max_tokens"),
    history_rounds: value("history_rounds"), thinking: $("thinking").checked,
    tools: state.tools.filter((tool) => chosen.includes(tool.function.name)),
  };
}

function showSliderValues() {
  for (const output of document.querySelectorAll(".slider output")) {
    const input = $(output.htmlFor.value);
    const atMax = input.id === "max_tokens" && input.value === input.max;
    output.textContent = atMax ? `${input.value} (${t("unlimited")})` : input.value;
  }
}

function limitTools() {
  const boxes = [...document.querySelectorAll("#tools input")];
  const full = boxes.filter((box) => box.checked).length >= MAX_TOOLS;
  for (const box of boxes) box.disabled = full && !box.checked;
}

function applyLanguage() {
  document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
  for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  for (const button of document.querySelectorAll(".languages button")) {
    button.classList.toggle("active", button.dataset.lang === state.lang);
  }
  for (const label of document.querySelectorAll("#tools label span")) {
    label.textContent = TOOL_LABELS[label.dataset.tool]?.[state.lang === "zh" ? 0 : 1] || label.dataset.tool;
  }
  $("input").placeholder = t("placeholder");
  $("greeting").textContent = t("greeting").replace("{name}", state.model?.id || "MiniMind");
  if (state.model) {
    const millions = (state.model.parameters / 1e6).toFixed(1);
    $("model-size").textContent = `${state.model.arch} · ${millions}M ${t("params")} · ${state.model.max_model_len} positions`;
  }
  showSliderValues();
}

async function loadServerInfo() {
  const [models, tools] = await Promise.all([fetch("/v1/models"), fetch("/v1/tools")]);
  if (!models.ok) throw new Error(await apiError(models));
  state.model = (await models.json()).data[0];
  state.tools = tools.ok ? (await tools.json()).data : [];
  $("model-name").textContent = state.model.id;
  document.title = `${state.model.id} · MiniMind`;
  $("thinking-switch").hidden = !state.model.thinking;
  const maxTokens = $("max_tokens");
  maxTokens.max = String(state.model.max_model_len);
  maxTokens.value = maxTokens.max;
  for (const tool of state.tools) {
    const label = $("tools").appendChild(element("label"));
    const box = label.appendChild(element("input"));
    box.type = "checkbox";
    box.value = tool.function.name;
    box.addEventListener("change", limitTools);
    label.appendChild(element("span")).dataset.tool = tool.function.name;
  }
}

async function start() {
  for (const button of document.querySelectorAll(".languages button")) {
    button.addEventListener("click", () => {
      state.lang = button.dataset.lang;
      localStorage.setItem("minimind-lang", state.lang);
      applyLanguage();
    });
  }
  for (const input of document.querySelectorAll(".slider input")) input.addEventListener("input", showSliderValues);
  $("new-chat").addEventListener("click", newChat);
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    ask(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  try {
    await loadServerInfo();
  } catch (error) {
    $("messages").append(element("p", "error", error.message));
  }
  applyLanguage();
  document.body.dataset.ready = "true";
}

start();
