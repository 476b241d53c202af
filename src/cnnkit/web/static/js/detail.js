// Detail views: a channel map enlarged (click a neuron), the arithmetic of a neuron by
// layer kind (CNN Explainer's convolution, ReLU, pooling and softmax views, for any
// layer of any model), and a layer's filters.

import { unpack } from "./api.js";
import { classColour, css, diverging, drawMap, fmt, fmtCell, fmtFull, ink } from "./colors.js";
import { clear, el, $ } from "./dom.js";
import { positionOf } from "./overview.js";

const ZOOM_PX = 360; // the enlarged map's longer side
const SHOWN_INPUT_CHANNELS = 6; // a convolution's input channels drawn (all are summed)

function maxAbs(values) {
  let m = 0;
  for (const v of values) if (v !== null && Math.abs(v) > m) m = Math.abs(v);
  return m;
}

// A grid of numbers coloured on +-m; cells outside the input (padding) are marked.
function grid(rows, { m = maxAbs(rows.flat()), numbers = true, pad = null, chosen = null } = {}) {
  const table = el("table", { class: "grid" });
  rows.forEach((row, r) => {
    const tr = el("tr");
    row.forEach((v, c) => {
      const isPad = pad && pad(r, c);
      const colour = v === null || isPad ? [225, 225, 225] : diverging(v, m);
      const td = el("td", {
        class: [isPad ? "pad" : "", chosen && chosen(r, c) ? "chosen" : ""].join(" ").trim() || null,
        title: v === null ? "padding (ignored)" : fmtFull(v),
        text: numbers ? (v === null ? "·" : fmtCell(v)) : "",
        style: { background: css(colour), color: ink(colour) },
      });
      tr.append(td);
    });
    table.append(tr);
  });
  return table;
}

function line(label, value, id) {
  return el("div", { class: "eq" }, [el("span", { class: "eq-label", text: label }),
    el("span", { class: "eq-value", id, text: value })]);
}

// The closing lines every view shares: the arithmetic's result and the model's value.
function verdict(view) {
  const ok = view.matches === true;
  return el("div", { class: "verdict" }, [
    view.result === null ? null : line("result of the arithmetic", fmtFull(view.result), "neuron-result"),
    el("div", { class: "eq" }, [
      el("span", { class: "eq-label", text: "activation the model computed" }),
      el("span", { class: "eq-value", id: "neuron-value", data: { value: String(view.value) },
        text: fmtFull(view.value) }),
      view.matches === null ? null : el("span", {
        class: ok ? "ok" : "bad",
        text: !ok ? "✗ differs: this layer's forward is not the plain operation"
          : view.requantize ? "✓ equal (to one int8 step)" : "✓ equal (to float32 rounding)",
      }),
    ]),
  ]);
}

function requantize(q) {
  if (!q) return null;
  return el("div", { class: "requant" }, [
    el("p", { text: `int8 layer: the real-valued result is rounded onto the output's int8 grid `
      + `(scale ${fmt(q.scale)}, zero point ${q.zero_point}${q.relu ? ", ReLU fused: q ≥ zero point" : ""}).` }),
    line("q = round(result / scale) + zero point", `round(${fmt(q.real)} / ${fmt(q.scale)}) + ${q.zero_point} = ${q.q}`),
    line("(q − zero point) × scale", fmt((q.q - q.zero_point) * q.scale)),
  ]);
}

// The source map (one channel) with the neuron's window outlined, if it was sent whole;
// padding ([top, bottom, left, right]) is drawn as a grey border around it.
function windowMap(state, source, channel, rows, cols, padding = [0, 0, 0, 0]) {
  const entry = source === -1 ? state.acts.x : source === null ? null : state.acts.layers[source];
  if (!entry || !entry.data || entry.data.shape.length !== 3) return null;
  const layer = source === -1 ? state.info.input_plan : state.info.layers[source];
  if (layer.stride !== 1 || channel >= entry.data.shape[0]) return null;
  const [, h, w] = entry.data.shape;
  const [top, bottom, left, right] = padding.map((p) => Math.min(p, 8));
  const cell = Math.max(2, Math.floor(96 / Math.max(h + top + bottom, w + left + right)));
  const canvas = el("canvas", { class: "window-map", width: (w + left + right) * cell,
    height: (h + top + bottom) * cell });
  const tmp = document.createElement("canvas");
  const m = Math.max(Math.abs(entry.min), Math.abs(entry.max));
  drawMap(tmp, entry.data.data, channel * h * w, h, w, (v) => diverging(v, m));
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#e1e1e1";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tmp, left * cell, top * cell, w * cell, h * cell);
  ctx.strokeStyle = "#111";
  ctx.lineWidth = 2;
  const r0 = Math.min(...rows) + top, r1 = Math.max(...rows) + top;
  const c0 = Math.min(...cols) + left, c1 = Math.max(...cols) + left;
  ctx.strokeRect(c0 * cell + 1, r0 * cell + 1, (c1 - c0 + 1) * cell - 2, (r1 - r0 + 1) * cell - 2);
  return canvas;
}

function convView(view, state, layer) {
  const [first, last] = view.in_channels;
  const [kh, kw] = [view.kernel[0].length, view.kernel[0][0].length];
  const numbers = kh * kw <= 25;
  const [h, w] = view.input_size;
  const pad = (r, c) => view.rows[r] < 0 || view.rows[r] >= h || view.cols[c] < 0 || view.cols[c] >= w;
  const mPatch = maxAbs(view.patch.flat(2)), mKernel = maxAbs(view.kernel.flat(2));
  const mProd = maxAbs(view.products.flat(2));
  const rows = [];
  const shown = Math.min(last - first, SHOWN_INPUT_CHANNELS);
  for (let k = 0; k < shown; k++) {
    const partial = view.products[k].flat().reduce((a, b) => a + b, 0);
    rows.push(el("div", { class: "conv-row" }, [
      el("div", { class: "conv-label", text: `input channel ${first + k}` }),
      windowMap(state, layer.source, first + k, view.rows, view.cols, view.padding),
      grid(view.patch[k], { m: mPatch, numbers, pad }), el("span", { class: "op", text: "⊙" }),
      grid(view.kernel[k], { m: mKernel, numbers }), el("span", { class: "op", text: "=" }),
      grid(view.products[k], { m: mProd, numbers, pad }),
      el("span", { class: "partial", text: `Σ ${fmt(partial)}` }),
    ]));
  }
  const terms = (last - first) * kh * kw;
  const paddingText = view.padding.some((p) => p) ? `padding ${view.padding.join("/")} (${view.padding_mode})` : "no padding";
  return [
    el("p", { class: "explain", text: `A convolution neuron is the sum of the elementwise products of its `
      + `kernel with the input patch under it, over all ${last - first} input channel${last - first > 1 ? "s" : ""} `
      + `of its group, plus the bias. Kernel ${kh}×${kw}, stride ${view.stride.join("×")}, dilation `
      + `${view.dilation.join("×")}, ${paddingText}, groups ${view.groups}. Grey cells are padding.` }),
    ...rows,
    last - first > shown ? el("p", { class: "note", text: `… and ${last - first - shown} more input channels `
      + `(drawn above: ${shown}); all ${terms} products are in the sum.` }) : null,
    line(`Σ of all ${terms} products`, fmtFull(view.sum)),
    line("+ bias", fmtFull(view.bias)),
    requantize(view.requantize),
    verdict(view),
  ];
}

function activationView(view, state, layer) {
  const [c, y, x] = view.position.length === 3 ? view.position : [view.position[0], null, null];
  const maps = y === null ? null : el("div", { class: "conv-row" }, [
    el("div", { class: "conv-label", text: "input → output" }),
    windowMap(state, layer.source, c, [y], [x]), el("span", { class: "op", text: "→" }),
    windowMap(state, layer.index, c, [y], [x]),
  ]);
  return [
    el("p", { class: "explain", text: `${view.function} is applied to each value on its own: `
      + `${view.function}(x) = ${view.formula}.` }),
    maps,
    line("x (the input at this position)", fmtFull(view.input)),
    line(`${view.function}(x) = ${view.formula}`, fmtFull(view.result)),
    requantize(view.requantize),
    verdict(view),
  ];
}

function poolView(view) {
  const flat = view.window.flat().filter((v) => v !== null);
  const best = view.op === "max" ? Math.max(...flat) : null;
  const text = view.op === "max"
    ? "Max pooling keeps the largest value of its window (padding is ignored)."
    : `Average pooling: the sum of its window divided by ${view.divisor}.`;
  return [
    el("p", { class: "explain", text }),
    el("div", { class: "conv-row" }, [
      el("div", { class: "conv-label", text: `window rows ${view.rows[0]}…${view.rows.at(-1)}, cols ${view.cols[0]}…${view.cols.at(-1)}` }),
      grid(view.window, { numbers: view.window.length * view.window[0].length <= 49,
        chosen: (r, c) => best !== null && view.window[r][c] === best }),
    ]),
    view.op === "max"
      ? line(`max of ${flat.length} values`, fmtFull(view.result))
      : line(`Σ ${flat.length} values / ${view.divisor}`, `${fmt(flat.reduce((a, b) => a + b, 0))} / ${view.divisor} = ${fmtFull(view.result)}`),
    verdict(view),
  ];
}

function normView(view) {
  return [
    el("p", { class: "explain", text: "Batch normalisation at inference: the value is standardised with the "
      + "running mean and variance learnt in training, then scaled and shifted (γ, β)." }),
    line("(x − μ) / √(σ² + ε) · γ + β",
      `(${fmt(view.input)} − ${fmt(view.mean)}) / √(${fmt(view.var)} + ${fmt(view.eps)}) · ${fmt(view.gamma)} + ${fmt(view.beta)}`),
    requantize(view.requantize),
    verdict(view),
  ];
}

function linearView(view, state, layer) {
  const products = unpack(view.products);
  const src = layer.source_shape;
  const where = (i) => (src.length === 3
    ? `(${Math.floor(i / (src[1] * src[2]))}, ${Math.floor(i / src[2]) % src[1]}, ${i % src[2]})` : `${i}`);
  const m = maxAbs(view.terms.map((t) => t.product));
  const table = el("table", { class: "terms" }, [
    el("tr", {}, ["input", "x", "w", "x · w", ""].map((t) => el("th", { text: t }))),
    ...view.terms.slice(0, 12).map((t) => el("tr", {}, [
      el("td", { text: where(t.index) }), el("td", { text: fmt(t.input) }),
      el("td", { text: fmt(t.weight) }), el("td", { text: fmt(t.product) }),
      el("td", {}, el("span", { class: "bar", style: {
        width: `${Math.round(60 * Math.abs(t.product) / (m || 1))}px`,
        background: css(diverging(t.product, m)) } })),
    ])),
  ]);
  let maps = null;
  if (src.length === 3) { // the products laid out as the flattened maps (CNN Explainer's flatten view)
    const [C, h, w] = src;
    const mp = maxAbs(products.data);
    maps = el("div", { class: "product-maps" });
    for (let c = 0; c < Math.min(C, 16); c++) {
      const canvas = el("canvas", { class: "map", title: `products of channel ${c}`,
        style: { width: `${w * Math.max(1, Math.floor(40 / Math.max(h, w)))}px` } });
      drawMap(canvas, products.data, c * h * w, h, w, (v) => diverging(v, mp));
      maps.append(canvas);
    }
  }
  return [
    el("p", { class: "explain", text: `A linear neuron is the sum of its ${view.terms_count} inputs, `
      + "each times its weight, plus the bias. The largest products:" }),
    table,
    maps ? el("p", { class: "note", text: `All products, laid out as the ${src.join("×")} maps that were flattened`
      + (src[0] > 16 ? " (first 16 channels):" : ":") }) : null,
    maps,
    line(`Σ of all ${view.terms_count} products`, fmtFull(view.sum)),
    line("+ bias", fmtFull(view.bias)),
    requantize(view.requantize),
    verdict(view),
  ];
}

function softmaxView(view, state) {
  const k = view.position[0];
  const classes = state.info.classes;
  const rows = view.logits.map((z, j) => el("tr", { class: j === k ? "chosen" : null }, [
    el("td", { text: classes[j] }), el("td", { text: fmt(z) }),
    el("td", { text: fmt(view.exps[j]) }), el("td", { text: fmt(view.exps[j] / view.sum) }),
  ]));
  const e = view.shift ? `e^(z − ${fmt(view.shift)})` : "e^z";
  return [
    el("p", { class: "explain", text: "Softmax turns the logits z into probabilities: "
      + `p_k = e^(z_k) / Σ_j e^(z_j)${view.shift ? " (computed with z − max z, which gives the same ratio)" : ""}.` }),
    el("table", { class: "terms" }, [el("tr", {}, ["class", "logit z", e, "p"].map((t) => el("th", { text: t }))), ...rows]),
    line(`p(${view.class}) = ${e} / Σ`, `${fmt(view.exps[k])} / ${fmt(view.sum)}`),
    verdict(view),
  ];
}

function passView(view) {
  const text = view.kind === "flatten" ? "Flatten lays the maps out as one vector; the value is unchanged."
    : view.kind === "identity" ? `${view.function} passes its input through unchanged at inference.`
      : `No arithmetic view for ${view.function}${view.position.length === 3 ? "" : " in this number of dims"}; `
        + "this is the value the model computed.";
  return [el("p", { class: "explain", text }),
    typeof view.input !== "number" ? null : line("input", fmtFull(view.input)), verdict(view)];
}

function argmaxView(view, state) {
  const classes = state.info.classes;
  const rows = view.scores.map((z, j) => el("tr", { class: j === view.result ? "chosen" : null }, [
    el("td", {}, el("span", { class: "swatch", style: { background: css(classColour(state.info, j)) } })),
    el("td", { text: classes[j] }), el("td", { text: fmt(z) }),
  ]));
  return [
    el("p", { class: "explain", text: "A segmentation gives each position the class with the highest score there." }),
    el("table", { class: "terms" }, [el("tr", {}, ["", "class", "score"].map((t) => el("th", { text: t }))), ...rows]),
    line("argmax", `${view.result} (${view.class})`),
    verdict(view),
  ];
}

const VIEWS = { conv: convView, activation: activationView, pool: poolView, norm: normView,
  linear: linearView, softmax: softmaxView, argmax: argmaxView };

// Where a neuron is, in words: (c, x) in a 1D map, (c, y, x) in 2D, (c, z, y, x) in 3D.
function place(position, layer) {
  const [c, ...at] = position;
  const axes = ["slice", "row", "column"].slice(3 - at.length);
  const words = at.map((v, i) => `${axes[i]} ${v}`).join(", ");
  return layer.kind === "mask" ? words : `channel ${c}, ${words}`;
}

export function showNeuron(state, view) {
  const layer = state.info.layers[view.layer];
  const where = view.position.length >= 2 ? place(view.position, layer)
    : layer.kind === "softmax" || layer.shape[0] === state.info.classes.length
      ? `class ${state.info.classes[view.position[0]]}` : `unit ${view.position[0]}`;
  // A neuron shown by value only (a 1D or 3D convolution or pooling) has no arithmetic to draw.
  const byValue = view.result === null && view.matches === null;
  const body = (byValue ? passView : VIEWS[view.kind] || passView)(view, state, layer);
  const outside = layer.source === null && layer.kind !== "softmax" ? el("p", { class: "note",
    text: "This layer's input was computed outside any module (a residual sum, a functional operation), "
      + "so it has no column of its own; the values shown are the input the layer received." }) : null;
  clear($("#arithmetic")).append(
    ...[el("h3", { text: `${view.name}: ${where}` }), outside, ...body].filter(Boolean),
  );
}

// The enlarged channel map; clicking a cell asks for that neuron.
export function showZoom(state, layerIndex, channel, onNeuron) {
  const entry = layerIndex < 0 ? state.acts.x : state.acts.layers[layerIndex];
  const layer = layerIndex < 0 ? state.info.input_plan : state.info.layers[layerIndex];
  const [, h, w] = entry.data.shape;
  const cell = Math.max(3, Math.min(40, Math.floor(ZOOM_PX / Math.max(h, w))));
  const slice = layerIndex < 0 ? state.acts.x_slice : entry.slice;
  const canvas = el("canvas", { id: "zoom-canvas", width: w * cell, height: h * cell,
    data: { cell, rows: h, cols: w, stride: layer.stride, layer: layerIndex, channel,
      slice: slice === null || slice === undefined ? "" : slice } });
  const m = Math.max(Math.abs(entry.min), Math.abs(entry.max));
  const mode = state.mode === "channel" ? entry.channelMax[channel] : state.mode === "network" ? state.acts.networkMax : m;
  const isMask = layer.kind === "mask";
  const values = entry.data.data.subarray(channel * h * w, (channel + 1) * h * w);
  const ctx = canvas.getContext("2d");
  ctx.font = `${Math.max(8, Math.floor(cell / 3.6))}px system-ui, sans-serif`;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      const colour = isMask ? classColour(state.info, values[r * w + c]) : diverging(values[r * w + c], mode);
      ctx.fillStyle = css(colour);
      ctx.fillRect(c * cell, r * cell, cell, cell);
      if (cell >= 30 && !isMask) {
        ctx.fillStyle = ink(colour);
        ctx.fillText(fmtCell(values[r * w + c]), c * cell + cell / 2, r * cell + cell / 2);
      }
    }
  }
  const sel = state.selection;
  if (sel && sel.layer === layerIndex && sel.position.length >= 2 && sel.position[0] === channel) {
    ctx.strokeStyle = "#111";
    ctx.lineWidth = 3;
    const at = sel.position.length === 2 ? [0, sel.position[1]] : sel.position.slice(-2);
    const [r, c] = [at[0] / (sel.position.length === 2 ? 1 : layer.stride), at[1] / layer.stride];
    ctx.strokeRect(c * cell + 1.5, r * cell + 1.5, cell - 3, cell - 3);
  }
  canvas.addEventListener("click", (event) => {
    const rect = canvas.getBoundingClientRect();
    const c = Math.floor((event.clientX - rect.left) * (canvas.width / rect.width) / cell);
    const r = Math.floor((event.clientY - rect.top) * (canvas.height / rect.height) / cell);
    if (r >= 0 && r < h && c >= 0 && c < w) onNeuron(layerIndex, positionOf(state, layerIndex, channel, r, c));
  });
  const name = layerIndex < 0 ? "input" : state.info.layers[layerIndex].name;
  const depth = layerIndex < 0 ? state.info.input_depth : layer.depth;
  const sliceText = slice === null || slice === undefined ? "" : `, slice ${slice + 1} of ${depth}`;
  clear($("#zoom")).append(
    el("h3", { text: `${name}, ${isMask ? "predicted classes" : `channel ${channel}`}${sliceText}` }),
    canvas,
    el("p", { class: "note", text: layerIndex < 0 ? "The normalised input the first layer sees."
      : `Click a neuron to see its arithmetic.${layer.stride > 1 ? ` Every ${layer.stride}th row and column is shown.` : ""}` }),
  );
}

// A convolution's kernels (rows: filters, columns: input channels) or a linear layer's weights.
export function showFilters(state, data) {
  const weights = unpack(data.weights);
  const [nOut, nIn, kh, kw] = weights.shape;
  const m = maxAbs(weights.data);
  const classes = state.info.classes;
  const isClasses = data.shape[0] === classes.length && state.info.layers[data.layer].index === state.info.layers.length - 2;
  const cell = Math.max(2, Math.min(12, Math.floor(48 / Math.max(kh, kw))));
  const table = el("table", { class: "filters" });
  for (let o = 0; o < nOut; o++) {
    const tr = el("tr", {}, el("th", { text: isClasses ? classes[o] : `${o}` }));
    for (let i = 0; i < nIn; i++) {
      const canvas = el("canvas", { class: "kernel", title: `filter ${o}, input channel ${i}`,
        style: { width: `${kw * cell}px`, height: `${kh * cell}px` } });
      drawMap(canvas, weights.data, (o * nIn + i) * kh * kw, kh, kw, (v) => diverging(v, m));
      tr.append(el("td", {}, canvas));
    }
    tr.append(el("td", { class: "bias", text: data.bias ? `bias ${fmt(data.bias[o])}` : "" }));
    table.append(tr);
  }
  const capped = data.shape[0] > nOut || data.shape[1] > nIn;
  clear($("#zoom"));
  clear($("#arithmetic")).append(
    el("h3", { text: `${data.name}: filters` }),
    el("p", { class: "explain", text: `Each row is one output channel's filter: a ${kh}×${kw} kernel per input `
      + `channel (columns), coloured on ±${fmt(m)} (blue positive, red negative).`
      + (data.kernel_shape && data.kernel_shape.length === 5
        ? ` Each ${data.kernel_shape.slice(2).join("×")} kernel is drawn as its ${data.kernel_shape[2]} depth slices, one above the other.` : "")
      + (capped ? ` Showing ${nOut} of ${data.shape[0]} filters and ${nIn} of ${data.shape[1]} input channels.` : "") }),
    el("div", { class: "filters-wrap" }, table),
  );
}
