// Steering playground: variants side by side through POST /v1/steering/compare.
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

// ---- variants -----------------------------------------------------------------------------------

function addVariant(initial = {}) {
  const list = $("#variants");
  if (list.children.length >= state.maxVariants) {
    setStatus(`At most ${state.maxVariants} variants.`, "error");
    return null;
  }
  const node = $("#variant-template").content.firstElementChild.cloneNode(true);
  const id = `v${state.nextId++}`;
  node.dataset.id = id;
  for (const [cls, label] of [["method", "method-label"], ["strength", "strength-label"], ["k", "k-label"]]) {
    const input = $(`.${cls}`, node);
    input.id = `${id}-${cls}`;
    $(`.${label}`, node).htmlFor = input.id;
  }
  const select = $(".method", node);
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
  const strength = $(".strength", node);
  strength.min = state.strength.min;
  strength.max = state.strength.max;
  strength.value = initial.strength ?? 1;
  select.value = initial.method || "none";
  if (initial.k) $(".k", node).dataset.want = initial.k;

  select.addEventListener("change", () => syncControls(node));
  strength.addEventListener("input", () => { $(".strength-value", node).value = strength.value; });
  $(".k", node).addEventListener("input", (e) => { $(".k-value", node).value = e.target.value; });
  $(".remove", node).addEventListener("click", () => removeVariant(node));
  list.appendChild(node);
  syncControls(node);
  relabel();
  return node;
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

function syncControls(node) {
  const value = $(".method", node).value;
  const strength = $(".strength", node);
  const k = $(".k", node);
  const isPreset = value.startsWith("preset:");
  const preset = isPreset ? state.presets.find((p) => `preset:${p.name}` === value) : null;
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
  renderSnippets();
}

function variantSpec(node) {
  const value = $(".method", node).value;
  const strength = Number($(".strength", node).value);
  const k = $(".k", node);
  if (value.startsWith("preset:")) {
    const name = value.slice("preset:".length);
    const preset = state.presets.find((p) => p.name === name);
    const spec = { preset: name };
    if (preset && preset.steering.method !== "none") spec.strength = strength;
    if (!k.disabled) spec.k = Number(k.value);
    return spec;
  }
  const spec = { method: value };
  if (value !== "none") spec.strength = strength;
  if (!k.disabled) spec.k = Number(k.value);
  return spec;
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

// ---- running ----------------------------------------------------------------------------------

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
  for (const node of $("#variants").children) {
    $(".completion", node).className = "completion pending";
    $(".completion", node).textContent = "Generating…";
    $(".result-meta", node).textContent = "";
    node.classList.remove("is-refusal", "is-ok");
  }
  setStatus(`Running ${body.variants.length} variant(s)…`);
  const started = performance.now();
  try {
    const r = await fetch("/v1/steering/compare", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(data.error ? data.error.message : `${r.status} ${r.statusText}`);
    showResults(data);
    const refusals = data.variants.filter((v) => v.is_refusal).length;
    setStatus(`Done in ${((performance.now() - started) / 1000).toFixed(2)} s · seed ${data.seed} · ${refusals} of ${data.variants.length} refused.`, "ok");
  } catch (e) {
    for (const node of $("#variants").children) {
      $(".completion", node).className = "completion empty";
      $(".completion", node).textContent = "No result.";
    }
    setStatus(`Error: ${e.message}`, "error");
  } finally {
    button.disabled = false;
    document.body.classList.remove("busy");
  }
}

function badge(text, cls, title) {
  const b = document.createElement("span");
  b.className = `badge ${cls}`;
  b.textContent = text;
  if (title) b.title = title;
  return b;
}

function showResults(data) {
  const nodes = [...$("#variants").children];
  data.variants.forEach((v, i) => {
    const node = nodes[i];
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
    const applied = v.steering;
    const desc = applied.method === "none" ? "unsteered"
      : `${applied.method} · strength ${applied.strength}${applied.k ? ` · k ${applied.k}` : ""}${applied.preset ? ` · preset ${applied.preset}` : ""}`;
    meta.appendChild(Object.assign(document.createElement("div"), { className: "applied", textContent: desc }));
    const comp = $(".completion", node);
    comp.className = "completion";
    comp.dataset.text = v.completion;
    comp.textContent = v.completion || "(empty)";
  });
  highlightDiffs();
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
    `    print(v["index"], v["steering"]["method"], v["is_refusal"], v["completion"][:80])\n`;
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
