// The overview: the network laid out layer by layer (CNN Explainer's main view), each
// column showing a layer's channel maps, or its values for a vector layer.

import { classColour, css, diverging, drawMap, fmt, sequential } from "./colors.js";
import { clear, el, $ } from "./dom.js";

const MAP_PX = 64; // CSS size of a map thumbnail's longer side
const ROWS_AS_TEXT = 32; // vectors up to this length are listed with their values

const KIND_LABEL = {
  conv: "convolution", linear: "linear", norm: "batch norm", pool: "pooling",
  activation: "activation", flatten: "flatten", softmax: "softmax", mask: "class per position",
  other: "other",
};

// A map (C, *spatial) is drawn as planes: 1D (C, L) as rows [1, L], 2D as itself, and a
// volume (C, D, H, W) one depth slice [H, W] at a time.
export function plane(shape) {
  return shape.length === 2 ? [1, shape[1]] : shape.slice(-2);
}

export function sentShape(layer) {
  if (layer.shape.length < 2) return [Math.min(layer.channels, layer.shape.reduce((a, b) => a * b))];
  const [h, w] = plane(layer.shape);
  return [layer.channels, Math.ceil(h / layer.stride), Math.ceil(w / layer.stride)];
}

// The neuron of layer i (-1: the input) under cell (r, c) of channel ch's sent plane, in the
// layer's own coordinates: [ch, x] (1D), [ch, y, x] (2D) or [ch, z, y, x] (3D, z: the slice shown).
export function positionOf(state, i, ch, r, c) {
  const layer = i < 0 ? { ...state.info.input_plan, shape: state.info.input_size } : state.info.layers[i];
  const entry = i < 0 ? state.acts.x : state.acts.layers[i];
  const [y, x] = [r * layer.stride, c * layer.stride];
  if (layer.shape.length === 2) return [ch, x];
  if (layer.shape.length === 4) return [ch, i < 0 ? state.acts.x_slice : entry.slice, y, x];
  return [ch, y, x];
}

// The range m of the colour scale: values in [-m, m]. i = -1 is the input.
export function scaleOf(state, i, c) {
  const acts = state.acts;
  if (state.mode === "network") return acts.networkMax;
  const entry = i < 0 ? acts.x : acts.layers[i];
  if (state.mode === "channel" && entry.data && entry.data.shape.length === 3) {
    return entry.channelMax[c];
  }
  return Math.max(Math.abs(entry.min), Math.abs(entry.max));
}

function note(layer) {
  const parts = [];
  if (layer.shape.length >= 2) {
    if (layer.channels < layer.shape[0]) parts.push(`showing ${layer.channels} of ${layer.shape[0]} channels`);
    if (layer.stride > 1) parts.push(`every ${layer.stride}th ${layer.shape.length === 2 ? "value" : "row and column"}`);
  } else if (layer.channels < layer.shape[0]) {
    parts.push(`showing ${layer.channels} of ${layer.shape[0]} values`);
  }
  if (layer.source === null && layer.kind !== "softmax") parts.push("input computed outside modules");
  return parts.join("; ");
}

function mapCanvas(shape, layerIndex, channel, onPick) {
  const [, h, w] = shape;
  const zoom = Math.max(1, Math.floor(MAP_PX / Math.max(h, w)));
  const rows = Math.max(h * zoom, h === 1 ? 8 : 0); // a 1D strip stays visible
  return el("canvas", {
    class: "map", title: `channel ${channel}`,
    data: { layer: layerIndex, channel },
    style: { width: `${w * zoom}px`, height: `${rows}px` },
    on: { click: () => onPick(layerIndex, channel) },
  });
}

// A layer's name inside its stage ("layer1.0.conv1" in stage "layer1" reads "0.conv1"); the
// full name is the tooltip, and a name still too long for its column ends in an ellipsis.
function shortName(name, stage) {
  return stage && name.startsWith(`${stage}.`) ? name.slice(stage.length + 1) : name;
}

function column(layer, info, handlers, stage = null) {
  const shape = sentShape(layer);
  const what = layer.kind === "conv" || layer.kind === "linear" ? "click for its filters" : layer.type;
  const name = el("button", {
    class: "layer-name", type: "button", text: shortName(layer.name, stage),
    title: `${layer.name}\n${what}`, data: { name: layer.name },
    on: { click: () => handlers.layer(layer.index) },
  });
  const meta = el("div", { class: "layer-meta", text: `${layer.type} · ${layer.shape.join("×")}` });
  const body = el("div", { class: "maps" });
  if (layer.shape.length >= 2) {
    for (let c = 0; c < shape[0]; c++) body.append(mapCanvas(shape, layer.index, c, handlers.channel));
  } else if (shape[0] <= ROWS_AS_TEXT) {
    const labels = shape[0] === info.classes.length ? info.classes : null;
    for (let j = 0; j < shape[0]; j++) {
      body.append(el("button", {
        class: "unit", type: "button", data: { layer: layer.index, unit: j },
        title: labels ? labels[j] : null,
        on: { click: () => handlers.neuron(layer.index, [j]) },
      }, [el("span", { class: "swatch" }), el("span", { class: "unit-label", text: labels ? labels[j] : j }),
        el("span", { class: "unit-value" })]));
    }
  } else {
    const cols = 16;
    const strip = el("canvas", {
      class: "strip", data: { layer: layer.index },
      style: { width: `${cols * 5}px`, height: `${Math.ceil(shape[0] / cols) * 5}px` },
    });
    strip.addEventListener("click", (event) => {
      const r = strip.getBoundingClientRect();
      const j = Math.floor((event.clientY - r.top) / 5) * cols + Math.floor((event.clientX - r.left) / 5);
      if (j < shape[0]) handlers.neuron(layer.index, [j]);
    });
    body.append(strip);
  }
  return el("div", { class: `layer kind-${layer.kind}`, id: `layer-${layer.index}` }, [
    name, meta, el("div", { class: "layer-kind", text: KIND_LABEL[layer.kind] || layer.kind }),
    el("div", { class: "layer-note", text: note(layer) }),
    layer.shape.length === 4 ? el("div", { class: "layer-slice" }) : null, body,
  ]);
}

// Consecutive layers grouped into stages by the leading parts of their names: the first part
// ("layer1"), one part more inside a group that holds over half the network (DenseNet's
// "features" -> "features.denseblock1", ...) or whose name comes back after other layers
// (U-Net's "encoder" around its pools -> "encoder.0", "encoder.1", ...).
export function stages(layers) {
  const split = (items, depth) => {
    const out = [];
    for (const layer of items) {
      const key = layer.name.split(".").slice(0, depth + 1).join(".");
      const last = out[out.length - 1];
      if (last && last.key === key) last.layers.push(layer);
      else out.push({ key, layers: [layer] });
    }
    const runs = {};
    for (const g of out) runs[g.key] = (runs[g.key] || 0) + 1;
    return out.flatMap((g) => ((g.layers.length > layers.length / 2 || runs[g.key] > 1)
      && g.layers.some((l) => l.name.split(".").length > depth + 1) ? split(g.layers, depth + 1) : [g]));
  };
  return split(layers, 0);
}

// A stage of several layers: a header that folds its layers' maps away (and back) on a click.
function stageBox(stage, info, handlers) {
  const body = el("div", { class: "stage-body" }, stage.layers.map((l) => column(l, info, handlers, stage.key)));
  const count = el("span", { class: "stage-count", text: `${stage.layers.length} layers` });
  const header = el("button", {
    class: "stage-name", type: "button", title: `${stage.key}: ${stage.layers.length} layers (click to fold or unfold)`,
    "aria-expanded": "true", data: { stage: stage.key },
  }, [el("span", { class: "stage-key", text: stage.key }), count]);
  const box = el("div", { class: "stage", data: { stage: stage.key } }, [header, body]);
  header.addEventListener("click", () => {
    const folded = box.classList.toggle("folded");
    header.setAttribute("aria-expanded", String(!folded));
  });
  return box;
}

export function buildOverview(info, handlers) {
  const root = clear($("#overview"));
  const inputLayer = {
    index: -1, name: "input", type: "normalised input", kind: "input", shape: info.input_size,
    channels: info.input_plan.channels, stride: info.input_plan.stride, source: -1,
  };
  const input = column(inputLayer, info, handlers);
  input.id = "layer-input";
  input.querySelector(".layer-kind").textContent = "(x − mean) / std";
  root.append(input);
  for (const stage of stages(info.layers.filter((layer) => !layer.hidden))) {
    root.append(stage.layers.length > 1 ? stageBox(stage, info, handlers) : column(stage.layers[0], info, handlers));
  }
}

function drawVector(column, entry, layer, state) {
  const values = entry.data.data;
  const softmax = layer.kind === "softmax";
  const m = softmax ? 1 : scaleOf(state, layer.index, 0);
  const colour = (v) => (softmax ? sequential(v) : diverging(v, m));
  const units = column.querySelectorAll(".unit");
  if (units.length) {
    units.forEach((unit, j) => {
      unit.querySelector(".swatch").style.background = css(colour(values[j]));
      unit.querySelector(".unit-value").textContent = fmt(values[j]);
    });
    return;
  }
  const strip = column.querySelector(".strip");
  const cols = 16;
  const padded = new Float32Array(Math.ceil(values.length / cols) * cols).fill(NaN);
  padded.set(values);
  drawMap(strip, padded, 0, padded.length / cols, cols,
    (v) => (Number.isNaN(v) ? [255, 255, 255, 0] : colour(v)));
}

export function drawOverview(state) {
  const { info, acts } = state;
  const entries = [[-1, acts.x], ...info.layers.map((layer, i) => [i, acts.layers[i]])];
  for (const [i, entry] of entries) {
    const layer = i < 0 ? null : info.layers[i];
    if (layer && layer.hidden) continue;
    const col = $(i < 0 ? "#layer-input" : `#layer-${i}`);
    if (entry.data.shape.length === 1) {
      drawVector(col, entry, layer, state);
      continue;
    }
    const [n, h, w] = entry.data.shape;
    const slice = i < 0 ? acts.x_slice : entry.slice;
    const depth = i < 0 ? info.input_depth : layer.depth;
    if (slice !== null && slice !== undefined) {
      col.dataset.slice = String(slice);
      col.querySelector(".layer-slice").textContent = `slice ${slice + 1} of ${depth}`;
    }
    col.querySelectorAll("canvas.map").forEach((canvas, c) => {
      if (c >= n) return;
      const m = scaleOf(state, i, c);
      const colour = layer && layer.kind === "mask" ? (v) => classColour(info, v) : (v) => diverging(v, m);
      drawMap(canvas, entry.data.data, c * h * w, h, w, colour);
    });
  }
}

// Outline the selected map or unit, and the maps of its source that feed it.
export function markSelection(state) {
  document.querySelectorAll(".selected, .feeds").forEach((node) => node.classList.remove("selected", "feeds"));
  const s = state.selection;
  if (!s) return;
  const col = $(`#layer-${s.layer}`);
  if (!col) return;
  const target = s.position.length >= 2
    ? col.querySelector(`canvas.map[data-channel="${s.position[0]}"]`)
    : col.querySelector(`.unit[data-unit="${s.position[0]}"]`);
  if (target) target.classList.add("selected");
  const feeds = state.feeds;
  if (!feeds) return;
  const source = feeds.source === -1 ? $("#layer-input") : $(`#layer-${feeds.source}`);
  if (!source) return;
  source.querySelectorAll("canvas.map").forEach((canvas, c) => {
    if (c >= feeds.channels[0] && c < feeds.channels[1]) canvas.classList.add("feeds");
  });
}
