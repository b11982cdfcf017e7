// The playground's heatmap: under a compared answer, "Inspect" asks POST /v1/steering/inspect for
// the prompt + that answer and draws every layer × token score on the pack's DiM axes (0: the
// harmless mean, blue; 1: the harmful mean, red), with the direction's logit lens beneath.
// No dependencies; app.js calls Heatmap.attach(column, request) when a variant's answer is shown.
"use strict";

const Heatmap = (() => {
  const PROMPT_TAIL = 8;   // last prompt tokens shown before the answer
  const MAX_ANSWER = 48;   // answer tokens shown

  // A diverging scale centred on 0.5: blue at ≤ 0, white at 0.5, red at ≥ 1.
  function colour(score) {
    if (score === null || !Number.isFinite(score)) return "#ccc";
    const t = Math.max(0, Math.min(1, score));
    const mix = (a, b, f) => Math.round(a + (b - a) * f);
    const [r, g, b] = t < 0.5
      ? [mix(49, 247, t * 2), mix(105, 247, t * 2), mix(185, 247, t * 2)]
      : [mix(247, 200, (t - 0.5) * 2), mix(247, 45, (t - 0.5) * 2), mix(247, 45, (t - 0.5) * 2)];
    return `rgb(${r}, ${g}, ${b})`;
  }

  function label(token) {
    const t = token.replace(/\s+/g, " ");
    return t.trim() ? t : "␣";
  }

  function render(box, data) {
    const first = Math.max(0, data.prompt_tokens - PROMPT_TAIL);
    const last = Math.min(data.tokens.length, data.prompt_tokens + MAX_ANSWER);
    const cols = [];
    for (let t = first; t < last; t++) cols.push(t);
    const table = document.createElement("table");
    table.className = "heatmap";
    table.dataset.layers = String(data.scores.length);
    table.dataset.tokens = String(cols.length);
    table.setAttribute("aria-label", `Scores on pack ${data.pack}: ${data.scores.length} layers × ${cols.length} tokens`);
    const head = table.createTHead().insertRow();
    head.appendChild(Object.assign(document.createElement("th"), { textContent: "layer", scope: "col" }));
    for (const t of cols) {
      const th = document.createElement("th");
      th.scope = "col";
      th.textContent = label(data.tokens[t]).slice(0, 6);
      th.title = `token ${t}: ${JSON.stringify(data.tokens[t])}`;
      if (t === data.prompt_tokens) th.className = "answer-start";
      head.appendChild(th);
    }
    const body = table.createTBody();
    // the deepest layer on top, as the stream flows upward
    for (let layer = data.scores.length - 1; layer >= 0; layer--) {
      const row = body.insertRow();
      const th = Object.assign(document.createElement("th"), { textContent: String(layer), scope: "row" });
      if (layer === data.layer) th.className = "pack-layer";
      row.appendChild(th);
      for (const t of cols) {
        const cell = row.insertCell();
        const s = data.scores[layer][t];
        cell.className = "cell" + (t === data.prompt_tokens ? " answer-start" : "");
        cell.style.background = colour(s);
        cell.dataset.score = String(s);
        cell.title = `layer ${layer} · ${JSON.stringify(data.tokens[t])} · ${s === null ? "n/a" : s.toFixed(3)}`;
      }
    }
    const lens = document.createElement("p");
    lens.className = "lens";
    const words = (items) => items.map((x) => JSON.stringify(x.token)).join(" ");
    lens.textContent = `layer ${data.layer} direction promotes ${words(data.logit_lens.promoted.slice(0, 6))}` +
      ` · suppresses ${words(data.logit_lens.suppressed.slice(0, 6))}`;
    const legend = document.createElement("p");
    legend.className = "hint";
    legend.textContent = `pack ${data.pack}: 0 (blue) = harmless mean, 1 (red) = harmful mean, per layer; ` +
      `the first ${cols.length > 0 && first < data.prompt_tokens ? data.prompt_tokens - first : 0} columns are the prompt's last tokens.`;
    const scroll = Object.assign(document.createElement("div"), { className: "heatmap-scroll" });
    scroll.appendChild(table);
    box.replaceChildren(scroll, lens, legend);
  }

  // A column's "Inspect" button; `request()` gives {prompt, completion, headers} at click time.
  function attach(column, request) {
    let box = column.querySelector(".inspect");
    if (!box) {
      box = document.createElement("div");
      box.className = "inspect";
      column.querySelector(".result").appendChild(box);
    }
    const button = Object.assign(document.createElement("button"), {
      type: "button", className: "secondary small inspect-button", textContent: "Inspect (heatmap)",
    });
    button.title = "layer × token scores of this answer on the refusal direction";
    box.replaceChildren(button);
    button.addEventListener("click", async () => {
      const { prompt, completion, headers } = request();
      button.disabled = true;
      button.textContent = "Inspecting…";
      try {
        const r = await fetch("/v1/steering/inspect", {
          method: "POST", headers, body: JSON.stringify({ prompt, completion, top_k: 8 }),
        });
        const data = await r.json().catch(() => ({}));
        if (!r.ok) throw new Error(data.error ? data.error.message : `${r.status} ${r.statusText}`);
        render(box, data);
      } catch (e) {
        box.replaceChildren(Object.assign(document.createElement("p"), {
          className: "status error", textContent: `Inspect failed: ${e.message}`,
        }));
      }
    });
    return button;
  }

  return { attach, colour };
})();
