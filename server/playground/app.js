// Steering playground: variants side by side through POST /v1/steering/compare, streamed (one
// server-sent-event stream whose events name their variant), so columns fill as they generate.
// No dependencies; talks to the server that serves this page.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";

const state = {
  model: null,          // served base model id
  methods: [],          // GET /v1/steering/methods data
  presets: [],          // preset names from GET /v1/models
  defaultPack: null,
  strength: { min: -8, max: 8 },
  maxVariants: 8,
  maxSteps: 4,          // interventions per variant
  nextId: 0,
  lastRequest: null,
};

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function getJSON(path) {
  const r = await fetch(path, { headers: headers() });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error ? body.error.message : `${r.status} ${r.statusText}`);
  return body;
}

function setStatus(text, kind = "") {
  const el = $("#status");
  el.textContent = text;
  el.className = `status ${kind}`;
}

// ---- discovery --------------------------------------------------------------------------------

async function discover() {
  const [models, methods] = await Promise.all([getJSON("/v1/models"), getJSON("/v1/steering/methods")]);
  state.model = models.data[0].id;
  state.presets = models.data.filter((m) => m.steering && m.id.includes("+")).map((m) => ({
    name: m.id.slice(m.id.indexOf("+") + 1), steering: m.steering, description: m.description,
  }));
  state.methods = methods.data;
  const withStrength = methods.data.find((m) => m.strength);
  if (withStrength) state.strength = withStrength.strength;
  try {
    const packs = await getJSON("/v1/steering/packs");
    const def = packs.data.find((p) => p.default && p.status !== "failed");
    state.defaultPack = def ? def.id : null;
  } catch (e) { /* packs are optional for the playground */ }
  $("#model-name").textContent = `model: ${state.model}`;
}

function methodInfo(id) {
  return state.methods.find((m) => m.id === id);
}

function kRange(method) {
  const info = methodInfo(method);
  if (!info || !info.uses_k) return null;
  const packs = info.packs || {};
  const pack = packs[state.defaultPack] || Object.values(packs)[0];
  return pack && pack.k ? pack.k : null;
}

// ---- variants and their interventions ------------------------------------------------------------
// A variant holds one or more interventions (a list, applied in order at every site); each has a
// method, strength, k, targeting (apply_to, a window of answer tokens) and an optional condition.

function methodOptions(select) {
  const group = document.createElement("optgroup");
  group.label = "Methods";
  for (const m of state.methods) {
    const opt = new Option(m.id, m.id);
    opt.title = m.description || "";
    group.appendChild(opt);
  }
  select.appendChild(group);
  if (state.presets.length) {
    const pg = document.createElement("optgroup");
    pg.label = "Presets";
    for (const p of state.presets) {
      const opt = new Option(`preset: ${p.name}`, `preset:${p.name}`);
      opt.title = p.description || "";
      pg.appendChild(opt);
    }
    select.appendChild(pg);
  }
}

function addVariant(initial = {}) {
  const list = $("#variants");
  if (list.children.length >= state.maxVariants) {
    setStatus(`At most ${state.maxVariants} variants.`, "error");
    return null;
  }
  const node = $("#variant-template").content.firstElementChild.cloneNode(true);
  node.dataset.id = `v${state.nextId++}`;
  $(".remove", node).addEventListener("click", () => removeVariant(node));
  $(".add-step", node).addEventListener("click", () => {
    const step = addStep(node, { method: "actadd", strength: 1 });
    if (step) $(".method", step).focus();
  });
  list.appendChild(node);
  for (const step of initial.steps || [initial]) addStep(node, step);
  relabel();
  return node;
}

function addStep(variant, initial = {}) {
  const steps = $(".steps", variant);
  if (steps.children.length >= state.maxSteps) {
    setStatus(`At most ${state.maxSteps} interventions per variant.`, "error");
    return null;
  }
  const node = $("#step-template").content.firstElementChild.cloneNode(true);
  const id = `s${state.nextId++}`;
  for (const [cls, label] of [["method", "method-label"], ["strength", "strength-label"],
    ["k", "k-label"], ["apply-to", "apply-label"], ["window-start", "window-label"],
    ["when", "when-label"], ["threshold", "threshold-label"]]) {
    const input = $(`.${cls}`, node);
    input.id = `${id}-${cls}`;
    $(`.${label}`, node).htmlFor = input.id;
  }
  const select = $(".method", node);
  methodOptions(select);
  const strength = $(".strength", node);
  strength.min = state.strength.min;
  strength.max = state.strength.max;
  strength.value = initial.strength ?? 1;
  select.value = initial.method || "none";
  if (initial.k) $(".k", node).dataset.want = initial.k;
  $(".apply-to", node).value = initial.apply_to || "all";
  if (initial.generation_window) {
    $(".window-start", node).value = initial.generation_window[0] ?? "";
    $(".window-end", node).value = initial.generation_window[1] ?? "";
  }
  if (initial.when) {
    $(".when", node).value = initial.when.above !== undefined ? "above" : "below";
    $(".threshold", node).value = initial.when.above ?? initial.when.below;
  }

  select.addEventListener("change", () => syncControls(node));
  $(".apply-to", node).addEventListener("change", () => syncControls(node));
  $(".when", node).addEventListener("change", () => syncControls(node));
  strength.addEventListener("input", () => { $(".strength-value", node).value = strength.value; });
  $(".k", node).addEventListener("input", (e) => { $(".k-value", node).value = e.target.value; });
  $(".remove-step", node).addEventListener("click", () => removeStep(variant, node));
  steps.appendChild(node);
  syncControls(node);
  relabelSteps(variant);
  return node;
}

function removeStep(variant, node) {
  node.remove();
  relabelSteps(variant);
  const first = $(".step .method", variant);
  if (first) first.focus();
  state.lastRequest = null;
  renderSnippets();
}

function relabelSteps(variant) {
  const steps = $(".steps", variant);
  steps.classList.toggle("single", steps.children.length <= 1);
  [...steps.children].forEach((step, i) => {
    $(".step-title", step).textContent = `Intervention ${i + 1}`;
    $(".remove-step", step).setAttribute("aria-label", `Remove intervention ${i + 1}`);
  });
  $(".add-step", variant).disabled = steps.children.length >= state.maxSteps;
}

function removeVariant(node) {
  const list = $("#variants");
  if (list.children.length <= 1) {
    setStatus("Keep at least one variant.", "error");
    return;
  }
  const next = node.nextElementSibling || node.previousElementSibling;
  node.remove();
  relabel();
  if (next) $(".remove", next).focus();
  highlightDiffs();
  renderSnippets();
}

function relabel() {
  [...$("#variants").children].forEach((node, i) => {
    const name = `Variant ${LETTERS[i] || i + 1}`;
    $(".variant-title", node).textContent = name;
    node.setAttribute("aria-label", name);
    $(".remove", node).setAttribute("aria-label", `Remove ${name}`);
  });
  $("#add-variant").disabled = $("#variants").children.length >= state.maxVariants;
}

function presetOf(value) {
  return value.startsWith("preset:") ? state.presets.find((p) => `preset:${p.name}` === value) : null;
}

function syncControls(node) {
  const value = $(".method", node).value;
  const strength = $(".strength", node);
  const k = $(".k", node);
  const preset = presetOf(value);
  const method = preset ? preset.steering.method : value;
  if (preset) strength.value = preset.steering.strength;
  strength.disabled = method === "none";
  $(".strength-value", node).value = method === "none" ? "—" : strength.value;
  const range = kRange(method);
  if (range) {
    k.min = range.min;
    k.max = range.max;
    const want = preset && preset.steering.k ? preset.steering.k : (k.dataset.want || k.value);
    k.value = Math.min(Math.max(Number(want), range.min), range.max);
    delete k.dataset.want;
    k.disabled = false;
    $(".k-value", node).value = k.value;
    $(".k-hint", node).textContent = `(1–${range.max})`;
  } else {
    k.disabled = true;
    $(".k-value", node).value = "—";
    $(".k-hint", node).textContent = "(INLP methods only)";
  }
  const onAnswer = $(".apply-to", node).value === "generation";
  for (const cls of ["window-start", "window-end"]) $(`.${cls}`, node).disabled = !onAnswer;
  $(".window", node).classList.toggle("disabled", !onAnswer);
  const conditional = $(".when", node).value !== "";
  $(".threshold", node).disabled = !conditional;
  $(".threshold", node).closest(".field").classList.toggle("disabled", !conditional);
  renderSnippets();
}

function stepSpec(node) {
  const value = $(".method", node).value;
  const strength = Number($(".strength", node).value);
  const k = $(".k", node);
  const preset = presetOf(value);
  const method = preset ? preset.steering.method : value;
  const spec = preset ? { preset: preset.name } : { method };
  if (method !== "none") spec.strength = strength;
  if (!k.disabled) spec.k = Number(k.value);
  const applyTo = $(".apply-to", node).value;
  const from = $(".window-start", node).value, to = $(".window-end", node).value;
  if (applyTo === "generation" && (from !== "" || to !== "")) {
    spec.generation_window = [from === "" ? 0 : Number(from), to === "" ? null : Number(to)];
  } else if (applyTo !== "all") {
    spec.apply_to = applyTo;
  }
  const when = $(".when", node).value;
  if (when) spec.when = { [when]: Number($(".threshold", node).value) };
  return spec;
}

// One intervention: a steering object (may name a preset); several: {"steering": [objects]}
// (list elements are plain steering objects, so a preset is spelled out as its fields).
function variantSpec(node) {
  const steps = [...$(".steps", node).children].map(stepSpec);
  if (steps.length === 1) return steps[0];
  return {
    steering: steps.map((s) => {
      if (!s.preset) return s;
      const p = state.presets.find((x) => x.name === s.preset);
      const { preset, ...rest } = s;
      return { method: p.steering.method, ...(p.steering.k ? { k: p.steering.k } : {}), ...rest };
    }),
  };
}

function buildRequest() {
  const body = {
    model: state.model,
    messages: [{ role: "user", content: $("#prompt").value }],
    max_tokens: Number($("#max-tokens").value) || 64,
    temperature: Number($("#temperature").value),
    variants: [...$("#variants").children].map(variantSpec),
  };
  const seed = $("#seed").value;
  if (seed !== "") body.seed = Number(seed);
  return body;
}

// ---- running: one server-sent-event stream, events tagged by variant ------------------------------

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function run() {
  const body = buildRequest();
  if (!body.messages[0].content.trim()) {
    setStatus("Write a prompt first.", "error");
    $("#prompt").focus();
    return;
  }
  state.lastRequest = body;
  renderSnippets();
  const button = $("#run");
  button.disabled = true;
  document.body.classList.add("busy");
  const nodes = [...$("#variants").children];
  for (const node of nodes) {
    const comp = $(".completion", node);
    comp.className = "completion pending";
    comp.textContent = "Generating…";
    delete comp.dataset.text;
    delete comp.dataset.partial;
    $(".result-meta", node).textContent = "";
    for (const c of node.querySelectorAll(".condition-result")) { c.textContent = ""; c.className = "condition-result"; }
    for (const c of node.querySelectorAll(".inspect")) c.remove();
    node.classList.remove("is-refusal", "is-ok");
  }
  setStatus(`Running ${body.variants.length} variant(s)…`);
  const started = performance.now();
  try {
    const r = await fetch("/v1/steering/compare", {
      method: "POST", headers: headers(), body: JSON.stringify({ ...body, stream: true }),
    });
    if (!r.ok) {
      const data = await r.json().catch(() => ({}));
      throw new Error(data.error ? data.error.message : `${r.status} ${r.statusText}`);
    }
    let summary = null;
    if (!(r.headers.get("content-type") || "").startsWith("text/event-stream")) {
      summary = await r.json();  // a server that answers the whole comparison at once
      summary.variants.forEach((v, i) => showResult(nodes[i], v));
    }
    for await (const event of summary ? [] : sseEvents(r)) {
      if (event.error) throw new Error(event.error.message);
      if (event.type === "delta") appendDelta(nodes[event.index], event.text);
      else if (event.type === "variant") showResult(nodes[event.index], event.result);
      else if (event.type === "done") summary = event.compare;
    }
    if (!summary) throw new Error("the stream ended early");
    highlightDiffs();
    const refusals = summary.variants.filter((v) => v.is_refusal).length;
    setStatus(`Done in ${((performance.now() - started) / 1000).toFixed(2)} s · seed ${summary.seed} · ${refusals} of ${summary.variants.length} refused.`, "ok");
  } catch (e) {
    for (const node of nodes) {
      const comp = $(".completion", node);
      if (comp.dataset.text !== undefined) continue;
      comp.className = "completion empty";
      comp.textContent = "No result.";
    }
    setStatus(`Error: ${e.message}`, "error");
  } finally {
    button.disabled = false;
    document.body.classList.remove("busy");
  }
}

function appendDelta(node, text) {
  if (!node || !text) return;
  const comp = $(".completion", node);
  const partial = (comp.dataset.partial || "") + text;
  comp.dataset.partial = partial;
  comp.className = "completion streaming";
  comp.textContent = partial;
}

function badge(text, cls, title) {
  const b = document.createElement("span");
  b.className = `badge ${cls}`;
  b.textContent = text;
  if (title) b.title = title;
  return b;
}

function describeApplied(a) {
  if (a.method === "none" && !a.condition) return a.preset ? `unsteered · preset ${a.preset}` : "unsteered";
  let out = a.method === "none" ? "none" : `${a.method} · strength ${a.strength}${a.k ? ` · k ${a.k}` : ""}`;
  if (a.generation_window) out += ` · answer tokens ${a.generation_window[0]}–${a.generation_window[1] ?? "end"}`;
  else if (a.apply_to && a.apply_to !== "all") out += ` · ${a.apply_to} only`;
  if (a.preset) out += ` · preset ${a.preset}`;
  if (a.condition) out += ` · score ${a.condition.score.toFixed(2)} ${a.condition.applied ? "applied" : "skipped"}`;
  return out;
}

function showResult(node, v) {
  if (!node) return;
  node.classList.toggle("is-refusal", v.is_refusal);
  node.classList.toggle("is-ok", !v.is_refusal);
  const meta = $(".result-meta", node);
  meta.replaceChildren(
    v.is_refusal ? badge("refusal", "refusal", "the evaluation's refusal matcher fired")
      : badge("answered", "ok", "no refusal phrase found"),
    badge(`score ${v.refusal_score === null ? "n/a" : `${v.refusal_score_exact ? "" : "≥ "}${v.refusal_score.toFixed(2)}`}`,
      "neutral", "log-odds of a refusal opener at the first answer position" +
      (v.refusal_score_exact ? "" : " (a lower bound: the refusal tokens were outside the top 50)")),
    badge(`${v.completion_tokens} tok`, "neutral", `finish: ${v.finish_reason}`),
    badge(`${v.time_s.toFixed(2)} s`, "neutral", "time to the variant's last token"),
  );
  const applied = Array.isArray(v.steering) ? v.steering : [v.steering];
  meta.appendChild(Object.assign(document.createElement("div"), {
    className: "applied", textContent: applied.map(describeApplied).join(" → "),
  }));
  const steps = [...$(".steps", node).children];
  applied.forEach((a, i) => {
    const out = steps[i] && $(".condition-result", steps[i]);
    if (!out) return;
    if (a.condition) {
      out.textContent = `prompt score ${a.condition.score.toFixed(3)} → ${a.condition.applied ? "applied" : "not applied"}`;
      out.className = `condition-result ${a.condition.applied ? "on" : "off"}`;
    } else {
      out.textContent = "";
      out.className = "condition-result";
    }
  });
  const comp = $(".completion", node);
  comp.className = "completion";
  comp.dataset.text = v.completion;
  comp.textContent = v.completion || "(empty)";
  if (typeof Heatmap !== "undefined" && v.completion) {  // heatmap.js: layer × token scores
    const prompt = $("#prompt").value;
    Heatmap.attach(node, () => ({ prompt, completion: v.completion, headers: headers() }));
  }
}

// ---- differences between columns -------------------------------------------------------------

function tokens(text) {
  return text.match(/\s+|[^\s]+/g) || [];
}

// Marks for `b`'s words not in the longest common subsequence with `a` (words only).
function diffMarks(a, b) {
  const wa = a.filter((t) => t.trim());
  const wb = b.filter((t) => t.trim());
  const n = wa.length, m = wb.length;
  const dp = Array.from({ length: n + 1 }, () => new Uint16Array(m + 1));
  for (let i = n - 1; i >= 0; i--)
    for (let j = m - 1; j >= 0; j--)
      dp[i][j] = wa[i] === wb[j] ? dp[i + 1][j + 1] + 1 : Math.max(dp[i + 1][j], dp[i][j + 1]);
  const keep = new Array(m).fill(false);
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (wa[i] === wb[j]) { keep[j] = true; i++; j++; }
    else if (dp[i + 1][j] >= dp[i][j + 1]) i++;
    else j++;
  }
  return keep;
}

function highlightDiffs() {
  const nodes = [...$("#variants").children];
  const texts = nodes.map((n) => $(".completion", n).dataset.text);
  if (texts[0] === undefined) return;
  const base = tokens(texts[0].slice(0, 4000));
  nodes.forEach((node, idx) => {
    const text = texts[idx];
    const comp = $(".completion", node);
    if (text === undefined || !text) return;
    if (idx === 0) { comp.textContent = text; return; }
    const toks = tokens(text.slice(0, 4000));
    const keep = diffMarks(base, toks);
    comp.replaceChildren();
    let w = 0;
    for (const t of toks) {
      if (!t.trim()) { comp.appendChild(document.createTextNode(t)); continue; }
      if (keep[w++]) comp.appendChild(document.createTextNode(t));
      else comp.appendChild(Object.assign(document.createElement("mark"), { textContent: t }));
    }
    if (text.length > 4000) comp.appendChild(document.createTextNode(text.slice(4000)));
  });
}

// ---- snippets -----------------------------------------------------------------------------------

function shellQuote(s) {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

function pyLiteral(value, indent = 0) {
  const pad = " ".repeat(indent);
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => `${pad}    ${pyLiteral(v, indent + 4)}`).join(",\n")},\n${pad}]`;
  }
  const entries = Object.entries(value);
  if (!entries.length) return "{}";
  const flat = entries.every(([, v]) => typeof v !== "object" || v === null);
  if (flat) return `{${entries.map(([k, v]) => `${JSON.stringify(k)}: ${pyLiteral(v)}`).join(", ")}}`;
  return `{\n${entries.map(([k, v]) => `${pad}    ${JSON.stringify(k)}: ${pyLiteral(v, indent + 4)}`).join(",\n")},\n${pad}}`;
}

function renderSnippets() {
  if (!state.model) return;
  const body = state.lastRequest || buildRequest();
  const url = `${location.origin}/v1/steering/compare`;
  const auth = $("#api-key").value.trim() ? ` \\\n  -H 'Authorization: Bearer $STEER_API_KEY'` : "";
  $("#curl-snippet").textContent =
    `curl -s ${url} \\\n  -H 'Content-Type: application/json'${auth} \\\n  -d ${shellQuote(JSON.stringify(body, null, 2))}`;
  const keyLine = $("#api-key").value.trim() ? `,\n    headers={"Authorization": "Bearer " + os.environ["STEER_API_KEY"]}` : "";
  $("#python-snippet").textContent =
    `${keyLine ? "import os\n\n" : ""}import httpx\n\nbody = ${pyLiteral(body)}\n` +
    `r = httpx.post(\n    ${JSON.stringify(url)},\n    json=body${keyLine},\n    timeout=600,\n)\n` +
    `r.raise_for_status()\nfor v in r.json()["variants"]:\n` +
    `    print(v["index"], v["steering"], v["is_refusal"], v["completion"][:80])\n`;
}

async function copy(targetId, button) {
  const text = $(`#${targetId}`).textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {
    const range = document.createRange();
    range.selectNodeContents($(`#${targetId}`));
    const sel = getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    document.execCommand("copy");
  }
  const old = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = old; }, 1200);
}

// ---- start --------------------------------------------------------------------------------------

async function main() {
  $("#run").addEventListener("click", run);
  $("#add-variant").addEventListener("click", () => {
    const node = addVariant({ method: "actadd", strength: 1 });
    if (node) $(".method", node).focus();
  });
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
      e.preventDefault();
      if (!$("#run").disabled) run();
    }
  });
  for (const b of document.querySelectorAll("[data-copy]")) {
    b.addEventListener("click", () => copy(b.dataset.copy, b));
  }
  for (const id of ["prompt", "max-tokens", "temperature", "seed", "api-key"]) {
    $(`#${id}`).addEventListener("input", () => { state.lastRequest = null; renderSnippets(); });
  }
  $("#variants").addEventListener("input", () => { state.lastRequest = null; renderSnippets(); });
  $("#variants").addEventListener("change", () => { state.lastRequest = null; renderSnippets(); });
  try {
    await discover();
  } catch (e) {
    setStatus(`Could not reach the server: ${e.message}. Reload when it is ready.`, "error");
    $("#model-name").textContent = "not connected";
    return;
  }
  addVariant({ method: "none" });
  const second = state.presets.find((p) => p.name === "no-refusal") ? "preset:no-refusal"
    : (state.methods.find((m) => m.id === "ablate") ? "ablate" : "none");
  addVariant({ method: second });
  renderSnippets();
  document.body.dataset.ready = "true";
  setStatus("Ready. Ctrl+Enter runs.");
}

main();
