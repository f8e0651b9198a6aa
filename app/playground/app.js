// Boomerang playground: chat with one size, compare sizes side by side, see the family at a glance.
// Plain JavaScript, no dependencies, no request to any host but this server.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "boomerang.apiKey";
  const SVG = "http://www.w3.org/2000/svg"; // a namespace name, never fetched
  const state = {
    family: null, sizes: [], history: [], speeds: new Map(), chatAbort: null, compareAborts: [], retry: null,
  };

  // ---------- small helpers ----------
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (name === "className") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value);
    }
    node.append(...children);
    return node;
  }
  function svg(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  const fmt = (x, digits = 3) => (x === null || x === undefined || !Number.isFinite(x) ? "—"
    : Math.abs(x) >= 1000 ? Math.round(x).toLocaleString("en-US") : Number(x.toPrecision(digits)).toString());
  const fmtCount = (n) => (n >= 1e9 ? `${fmt(n / 1e9)} B` : n >= 1e6 ? `${fmt(n / 1e6)} M` : n >= 1e3 ? `${fmt(n / 1e3)} k` : `${n}`);
  const median = (xs) => {
    if (!xs.length) return null;
    const s = [...xs].sort((a, b) => a - b);
    return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
  };
  const sizeById = (id) => state.sizes.find((s) => s.id === id);
  const sizeName = (s) => `${s.id} · ${s.num_layers} layers`;

  function showStatus(message, kind = "error") {
    const box = $("status");
    box.textContent = message;
    box.className = kind === "error" ? "status" : "status info";
    box.setAttribute("role", kind === "error" ? "alert" : "status");
    box.hidden = false;
  }
  function clearStatus() { $("status").hidden = true; $("status").textContent = ""; }

  // ---------- API ----------
  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }
  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }
  async function errorFrom(response) {
    let detail = {};
    try { detail = (await response.json()).error || {}; } catch (_) { /* not JSON */ }
    let message = `${response.status} ${detail.type || response.statusText || "error"}: ${detail.message || "request failed"}`;
    if (detail.code) message += ` [${detail.code}]`;
    if (response.status === 401) message += " — enter a valid key in Settings › API key.";
    if (response.status === 429) {
      const after = response.headers.get("Retry-After");
      message += after ? ` — the server is busy; retry in ${after} s.` : " — the server is busy; retry shortly.";
    }
    if (detail.code === "context_length_exceeded") message += " — clear the conversation or lower max tokens.";
    return new ApiError(message, response.status);
  }
  function settings() {
    const maxTokens = parseInt($("max-tokens").value, 10), seed = parseInt($("seed").value, 10);
    return { temperature: parseFloat($("temperature").value), max_tokens: Number.isFinite(maxTokens) ? maxTokens : 200,
      ...(Number.isFinite(seed) && seed >= 0 ? { seed } : {}) };
  }
  function withSystem(messages) {
    const system = $("system-prompt").value.trim();
    return system ? [{ role: "system", content: system }, ...messages] : messages;
  }

  // One streamed chat answer: calls onText with the text so far after every delta; returns text and timings.
  // `target` names the size: { model } or, for auto, { model: family, num_layers: "auto", max_latency_ms }.
  async function streamChat(target, messages, signal, onText) {
    const body = { ...target, messages, stream: true, stream_options: { include_usage: true }, ...settings() };
    const start = performance.now();
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal,
    });
    if (!response.ok) throw await errorFrom(response);
    const served = response.headers.get("x-boomerang-num-layers");
    const servedSize = served && state.sizes.find((s) => String(s.num_layers) === served);
    const result = { text: "", model: servedSize ? servedSize.id : target.model, deltas: 0, usage: null, finish: null, error: null };
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", first = null, last = null;
    const handle = (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        result.error = `stream ended with ${chunk.error.type || "error"}: ${chunk.error.message}`;
        return;
      }
      if (chunk.model && sizeById(chunk.model)) result.model = chunk.model;
      if (chunk.usage) result.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        // a token: every delta but the role's prelude (its text may be held back until a character is whole)
        if (typeof delta.content === "string" && !delta.role) {
          last = performance.now();
          if (first === null) first = last;
        }
        const piece = delta.content;
        if (piece) {
          result.text += piece;
          result.deltas += 1;
          onText(result.text, result.deltas);
        }
        if (choice.finish_reason) result.finish = choice.finish_reason;
      }
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) if (line.startsWith("data:")) handle(line.slice(5).trim());
        }
      }
    } catch (error) {
      if (error.name !== "AbortError") throw error;
      result.finish = "stopped";
    }
    const tokens = result.usage ? result.usage.completion_tokens : result.deltas;
    result.tokens = tokens;
    result.ttftMs = first === null ? null : first - start;
    result.totalMs = performance.now() - start;
    // decode speed: the tokens after the first over the time from the first token to the last
    result.tokensPerS = tokens > 1 && last > first ? (tokens - 1) / ((last - first) / 1000) : null;
    if (result.tokensPerS !== null && result.finish !== "stopped") {
      if (!state.speeds.has(result.model)) state.speeds.set(result.model, []);
      state.speeds.get(result.model).push(result.tokensPerS);
      renderFamily();
    }
    return result;
  }

  function statsLine(result) {
    const size = sizeById(result.model);
    const parts = [size ? sizeName(size) : result.model,
      `first token ${result.ttftMs === null ? "—" : `${Math.round(result.ttftMs)} ms`}`,
      `${result.tokensPerS === null ? "—" : fmt(result.tokensPerS)} tokens/s`,
      `${result.tokens} tokens`];
    if (result.usage) parts.push(`prompt ${result.usage.prompt_tokens}`);
    if (result.finish && result.finish !== "stop") parts.push(`ended: ${result.finish}`);
    return parts.join(" · ");
  }

  // ---------- the family ----------
  async function loadModels() {
    clearTimeout(state.retry);
    let response;
    try {
      response = await fetch("/v1/models", { headers: headers() });
    } catch (error) {
      showStatus(`Cannot reach the server: ${error.message}`);
      return;
    }
    if (response.status === 503) {
      showStatus("The family is still loading; this page retries every 2 s.", "info");
      state.retry = setTimeout(loadModels, 2000);
      return;
    }
    if (!response.ok) {
      showStatus((await errorFrom(response)).message);
      return;
    }
    const entries = (await response.json()).data;
    const roots = new Map();
    for (const e of entries) roots.set(e.root, (roots.get(e.root) || 0) + 1);
    // the family id is the root every size names; the family's own entry names its largest size instead
    const family = [...roots.entries()].sort((a, b) => b[1] - a[1])[0][0];
    state.family = family;
    state.sizes = entries.filter((e) => e.root === family).sort((a, b) => a.num_layers - b.num_layers);
    // a server that learns per-size speed (the `speed` field) also chooses sizes itself: `auto`
    state.auto = state.sizes.some((s) => s.speed && typeof s.speed === "object");
    clearStatus();
    $("family-name").textContent = `· ${family} · ${state.sizes.length} sizes`;
    buildSlider();
    buildCompareChoices();
    renderFamily();
  }

  function buildSlider() {
    const slider = $("size"), ticks = $("size-ticks"), labels = $("size-labels");
    const wasAuto = !slider.disabled && autoChosen();
    const previous = slider.disabled ? null : state.sizes[slider.value];
    const names = [...state.sizes.map((s) => String(s.num_layers)), ...(state.auto ? ["auto"] : [])];
    slider.max = String(Math.max(0, names.length - 1));
    ticks.replaceChildren(...names.map((name, i) => el("option", { value: String(i), label: name })));
    labels.replaceChildren(...names.map((name) => el("span", { text: name })));
    const keep = previous ? state.sizes.findIndex((s) => s.id === previous.id) : -1;
    slider.value = String(wasAuto && state.auto ? state.sizes.length : keep >= 0 ? keep : state.sizes.length - 1);
    slider.disabled = state.sizes.length === 0;
    showSize();
  }
  const autoChosen = () => state.auto && Number($("size").value) === state.sizes.length;
  function showSize() {
    const size = state.sizes[$("size").value];
    $("auto-budget-row").hidden = !autoChosen();
    if (!size && !autoChosen()) return;
    const text = autoChosen() ? "auto · the server picks the largest size that fits the latency budget"
      : `${sizeName(size)} · ${fmtCount(size.parameters)} parameters`;
    $("size-value").textContent = text;
    $("size").setAttribute("aria-valuetext", text);
  }

  // ---------- chat ----------
  function message(role, label) {
    const item = el("li", { className: `msg ${role}` }, el("div", { className: "who", text: label }),
      el("div", { className: "text" }));
    $("conversation").append(item);
    return item;
  }
  async function sendChat(event) {
    event.preventDefault();
    const input = $("chat-input"), content = input.value.trim();
    const auto = autoChosen(), size = state.sizes[$("size").value];
    if (!content || (!size && !auto) || state.chatAbort) return;
    const budget = parseFloat($("auto-budget").value);
    const target = auto ? { model: state.family, num_layers: "auto", ...(budget > 0 ? { max_latency_ms: budget } : {}) }
      : { model: size.id };
    clearStatus();
    const user = { role: "user", content };
    message("user", "You").querySelector(".text").textContent = content;
    input.value = "";
    const answer = message("assistant", auto ? "auto" : size.id);
    const text = answer.querySelector(".text");
    answer.setAttribute("aria-busy", "true");
    answer.dataset.size = auto ? "auto" : String(size.num_layers);
    state.chatAbort = new AbortController();
    $("chat-send").disabled = true;
    $("chat-stop").disabled = false;
    try {
      const result = await streamChat(target, withSystem([...state.history, user]), state.chatAbort.signal,
        (soFar, deltas) => { text.textContent = soFar; answer.dataset.deltas = String(deltas); });
      answer.append(el("div", { className: "stats", text: statsLine(result) }));
      if (auto && sizeById(result.model)) answer.querySelector(".who").textContent = `auto → ${result.model}`;
      if (result.error) answer.append(el("div", { className: "error", role: "alert", text: result.error }));
      state.history.push(user, { role: "assistant", content: result.text });
    } catch (error) {
      const shown = error instanceof ApiError ? error.message : `Request failed: ${error.message}`;
      answer.append(el("div", { className: "error", text: shown }));
      showStatus(shown);
    } finally {
      answer.setAttribute("aria-busy", "false");
      answer.dataset.done = "true";
      state.chatAbort = null;
      $("chat-send").disabled = false;
      $("chat-stop").disabled = true;
      answer.scrollIntoView({ block: "nearest" });
    }
  }

  // ---------- compare ----------
  function buildCompareChoices() {
    const box = $("compare-choices");
    const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
    const n = state.sizes.length;
    const defaults = new Set([0, Math.floor((n - 1) / 2), n - 1].map((i) => state.sizes[i] && state.sizes[i].id));
    box.replaceChildren(...state.sizes.map((s) => {
      const id = `cmp-${s.num_layers}`;
      const input = el("input", { type: "checkbox", id, value: s.id });
      input.checked = checked.size ? checked.has(s.id) : defaults.has(s.id);
      input.addEventListener("change", checkCompare);
      return el("label", { for: id }, input, ` ${s.num_layers} layers`);
    }));
    checkCompare();
  }
  function chosenSizes() {
    return [...$("compare-choices").querySelectorAll("input:checked")].map((i) => sizeById(i.value)).filter(Boolean);
  }
  function checkCompare() {
    const n = chosenSizes().length;
    const ok = n >= 2 && n <= 4;
    $("compare-send").disabled = !ok || state.compareAborts.length > 0;
    $("compare-hint").textContent = state.sizes.length < 2 ? "This family has a single size."
      : ok ? `${n} sizes chosen.` : `Choose two to four sizes (${n} chosen).`;
  }
  async function sendCompare(event) {
    event.preventDefault();
    const content = $("compare-input").value.trim();
    const sizes = chosenSizes();
    if (!content || sizes.length < 2 || sizes.length > 4 || state.compareAborts.length) return;
    clearStatus();
    const messages = withSystem([{ role: "user", content }]);
    $("compare-send").disabled = true;
    $("compare-stop").disabled = false;
    const columns = sizes.map((size) => {
      const column = el("article", { className: "column", "aria-busy": "true", "data-size": String(size.num_layers) },
        el("h3", { text: sizeName(size) }), el("div", { className: "text" }), el("div", { className: "stats" }));
      return { size, column, controller: new AbortController() };
    });
    state.compareAborts = columns.map((c) => c.controller);
    $("compare-columns").replaceChildren(...columns.map((c) => c.column));
    const errors = [];
    await Promise.all(columns.map(async ({ size, column, controller }) => {
      const text = column.querySelector(".text");
      try {
        const result = await streamChat({ model: size.id }, messages, controller.signal,
          (soFar, deltas) => { text.textContent = soFar; column.dataset.deltas = String(deltas); });
        column.querySelector(".stats").textContent = statsLine(result);
        if (result.error) column.append(el("div", { className: "error", text: result.error }));
      } catch (error) {
        const shown = error instanceof ApiError ? error.message : `Request failed: ${error.message}`;
        column.append(el("div", { className: "error", text: shown }));
        errors.push(`${size.id}: ${shown}`);
      } finally {
        column.setAttribute("aria-busy", "false");
        column.dataset.done = "true";
      }
    }));
    if (errors.length) showStatus(errors.join("\n"));
    state.compareAborts = [];
    $("compare-stop").disabled = true;
    checkCompare();
  }

  // ---------- the family at a glance ----------
  function flatten(object, prefix = "", out = {}) {
    for (const [key, value] of Object.entries(object || {})) {
      const name = prefix ? `${prefix} · ${key}` : key;
      if (typeof value === "number" && Number.isFinite(value)) out[name] = value;
      else if (value && typeof value === "object" && !Array.isArray(value)) flatten(value, name, out);
    }
    return out;
  }
  const isSpeed = (name) => /tokens_per_s/.test(name);
  const direction = (name) => (/perplexity|degenerate|loss|error/.test(name) ? "lower is better"
    : /accuracy|agreement|score/.test(name) ? "higher is better" : "");

  function chart(container, series, yLabel, emptyText) {
    // drawn at the width it is shown at, so its text keeps its size on a phone
    const W = Math.max(280, Math.round(container.clientWidth) || 640), H = 260, L = 56, R = 16, T = 30, B = 40;
    const points = series.flatMap((s) => s.points);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${yLabel} by layer count` });
    if (!points.length) {
      root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, emptyText));
      container.replaceChildren(root);
      return;
    }
    const xs = state.sizes.map((s) => s.num_layers);
    const ys = points.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs);
    let y0 = Math.min(0, ...ys), y1 = Math.max(...ys);
    if (y1 === y0) y1 = y0 + 1;
    y1 += (y1 - y0) * 0.05;
    const px = (x) => (x1 === x0 ? (L + W - R) / 2 : L + ((x - x0) / (x1 - x0)) * (W - L - R));
    const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    root.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }),
      svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
    for (let i = 0; i <= 4; i++) {
      const y = y0 + ((y1 - y0) * i) / 4;
      root.append(svg("line", { x1: L - 4, y1: py(y), x2: L, y2: py(y), class: "axis" }),
        svg("text", { x: L - 6, y: py(y) + 4, "text-anchor": "end" }, fmt(y)));
    }
    const step = Math.max(1, Math.ceil(xs.length / 12));
    xs.forEach((x, i) => {
      if (i % step && i !== xs.length - 1) return;
      root.append(svg("text", { x: px(x), y: H - B + 16, "text-anchor": "middle" }, String(x)));
    });
    root.append(svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", class: "label" }, "layers"),
      svg("text", { x: 8, y: 14, class: "label" }, yLabel));
    for (const s of series) {
      const sorted = [...s.points].sort((a, b) => a[0] - b[0]);
      if (sorted.length > 1) {
        root.append(svg("polyline", { class: `line ${s.cls}`, points: sorted.map(([x, y]) => `${px(x)},${py(y)}`).join(" ") }));
      }
      for (const [x, y] of sorted) {
        const dot = svg("circle", { cx: px(x), cy: py(y), r: 4, class: s.cls });
        dot.append(svg("title", {}, `${s.name}: ${x} layers, ${fmt(y)}`));
        root.append(dot);
      }
    }
    const legend = el("div", { className: "legend" }, ...series.map((s) =>
      el("span", {}, el("span", { className: `swatch ${s.cls}` }), s.name)));
    container.replaceChildren(root, legend);
  }

  function renderFamily() {
    if (!state.sizes.length) return;
    const flat = state.sizes.map((s) => flatten(s.quality));
    const names = [...new Set(flat.flatMap((f) => Object.keys(f)))];
    const quality = names.filter((n) => !isSpeed(n)), speed = names.filter(isSpeed);
    const picker = $("quality-metric");
    const chosen = picker.value || quality.find((n) => n === "chat · answer_perplexity") || quality[0] || "";
    if (picker.options.length !== quality.length) {
      picker.replaceChildren(...quality.map((n) => el("option", { value: n, text: n })));
    }
    picker.disabled = !quality.length;
    if (chosen) picker.value = chosen;

    const qualityPoints = state.sizes.map((s, i) => [s.num_layers, flat[i][chosen]]).filter((p) => p[1] !== undefined);
    chart($("quality-chart"), chosen ? [{ name: chosen, cls: "s1", points: qualityPoints }] : [],
      chosen || "quality", "The model card has no quality measures for this family.");
    $("quality-caption").textContent = chosen
      ? `Quality: "${chosen}" per size, from the model card in /v1/models${direction(chosen) ? ` (${direction(chosen)})` : ""}.`
      : "Quality: the model card in /v1/models lists no measures for these sizes.";

    const series = speed.map((name) => ({
      name: `model card: ${name}`, cls: "s2",
      points: state.sizes.map((s, i) => [s.num_layers, flat[i][name]]).filter((p) => p[1] !== undefined),
    }));
    const estimates = [...new Set(state.sizes.flatMap((s) => Object.keys(flatten(s.speed))))]
      .filter((n) => /decode/.test(n));
    estimates.forEach((name) => series.push({
      name: `server estimate: ${name}`, cls: "s3",
      points: state.sizes.map((s) => [s.num_layers, flatten(s.speed)[name]]).filter((p) => p[1] !== undefined),
    }));
    const session = state.sizes.map((s) => [s.num_layers, median(state.speeds.get(s.id) || [])])
      .filter((p) => p[1] !== null);
    series.push({ name: "this session: median of streamed answers", cls: "s1", points: session });
    chart($("speed-chart"), series.filter((s) => s.points.length), "tokens/s",
      "No speed yet: chat or compare to measure each size here.");
    $("speed-caption").textContent = "Speed: tokens/s per size. Session figures are measured in this page from "
      + "the streamed answers (tokens after the first ÷ time from the first token to the last; median per size; "
      + "sizes compared at once share the server, so they read lower)."
      + (speed.length ? " Model-card figures are the card's own measured decode speed on the machine it names." : "")
      + (estimates.length ? " Server estimates are learned by the server from the requests it served." : "");

    const head = ["size", "layers", "parameters", "bytes", ...quality, ...speed.map((n) => `card ${n}`),
      "session tokens/s (answers)"];
    $("family-table").tHead.replaceChildren(el("tr", {}, ...head.map((h) => el("th", { scope: "col", text: h }))));
    $("family-table").tBodies[0].replaceChildren(...state.sizes.map((s, i) => {
      const seen = state.speeds.get(s.id) || [];
      const cells = [s.num_layers, fmtCount(s.parameters), fmtCount(s.bytes), ...quality.map((n) => fmt(flat[i][n])),
        ...speed.map((n) => fmt(flat[i][n])), seen.length ? `${fmt(median(seen))} (${seen.length})` : "—"];
      return el("tr", {}, el("th", { scope: "row", text: s.id }), ...cells.map((c) => el("td", { text: String(c) })));
    }));
  }

  // ---------- tabs ----------
  const TABS = ["chat", "compare", "family"];
  function select(name, focus = false) {
    for (const tab of TABS) {
      const button = $(`tab-${tab}`), on = tab === name;
      button.setAttribute("aria-selected", String(on));
      button.tabIndex = on ? 0 : -1;
      $(`view-${tab}`).hidden = !on;
      if (on && focus) button.focus();
    }
    if (name === "family") { renderFamily(); if (state.auto) loadModels(); } // fresh server estimates
    if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  }

  // ---------- wiring ----------
  function init() {
    for (const tab of TABS) $(`tab-${tab}`).addEventListener("click", () => select(tab));
    document.querySelector(".tabs").addEventListener("keydown", (event) => {
      const i = TABS.findIndex((t) => $(`tab-${t}`) === document.activeElement);
      if (i < 0) return;
      const moves = { ArrowRight: 1, ArrowLeft: -1, Home: -i, End: TABS.length - 1 - i };
      if (!(event.key in moves)) return;
      event.preventDefault();
      select(TABS[(i + moves[event.key] + TABS.length) % TABS.length], true);
    });
    const key = $("api-key");
    key.value = sessionStorage.getItem(KEY_STORE) || "";
    key.addEventListener("change", () => {
      if (key.value.trim()) sessionStorage.setItem(KEY_STORE, key.value.trim());
      else sessionStorage.removeItem(KEY_STORE);
      loadModels();
    });
    $("forget-key").addEventListener("click", () => { key.value = ""; sessionStorage.removeItem(KEY_STORE); loadModels(); });
    $("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
    $("temperature-value").textContent = $("temperature").value;
    $("size").addEventListener("input", showSize);
    $("chat-form").addEventListener("submit", sendChat);
    $("compare-form").addEventListener("submit", sendCompare);
    for (const [input, form] of [["chat-input", "chat-form"], ["compare-input", "compare-form"]]) {
      $(input).addEventListener("keydown", (event) => {
        if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
          event.preventDefault();
          $(form).requestSubmit();
        }
      });
    }
    $("chat-stop").addEventListener("click", () => state.chatAbort && state.chatAbort.abort());
    $("compare-stop").addEventListener("click", () => state.compareAborts.forEach((c) => c.abort()));
    $("chat-clear").addEventListener("click", () => { state.history = []; $("conversation").replaceChildren(); });
    $("quality-metric").addEventListener("change", renderFamily);
    let resized;
    window.addEventListener("resize", () => {
      clearTimeout(resized);
      resized = setTimeout(() => { if (!$("view-family").hidden) renderFamily(); }, 150);
    });
    const start = location.hash.slice(1);
    select(TABS.includes(start) ? start : "chat");
    loadModels();
  }
  init();
})();
