// cnnkit explorer: the page's state and how the views react to clicks.

import { getJSON, postJSON, unpack, uploadImage } from "./api.js";
import { drawLegend, fmt } from "./colors.js";
import { clear, $ } from "./dom.js";
import { showFilters, showNeuron, showZoom } from "./detail.js";
import { buildOverview, drawOverview, markSelection, positionOf } from "./overview.js";
import * as panels from "./panels.js";

const state = {
  info: null, // /api/model
  acts: null, // /api/activations for the current input, decoded
  input: null, // the current input id
  mode: "layer", // colour range: per layer, per channel or the whole network
  zoom: null, // {layer, channel} shown enlarged
  selection: null, // {layer, position} of the neuron shown
  feeds: null, // {source, channels}: the maps the selected neuron reads
  depth: null, // the slider: the input's slice shown (volumes only); every layer at the same relative depth
  galleryOffset: 0,
};

function status(text, error = false) {
  const node = $("#status");
  node.textContent = text;
  node.classList.toggle("error", error);
}

async function guarded(task) {
  try {
    await task();
  } catch (e) {
    status(e.message, true);
  }
}

function channelMax(data) {
  if (data.shape.length !== 3) return null;
  const [n, h, w] = data.shape;
  const out = new Float32Array(n);
  for (let c = 0; c < n; c++) {
    let m = 0;
    for (let i = c * h * w; i < (c + 1) * h * w; i++) m = Math.max(m, Math.abs(data.data[i]));
    out[c] = m;
  }
  return out;
}

// Every map arrives as planes [n, h, w] (a 1D map as one row, a volume as its slice).
function decode(acts) {
  acts.x = { min: acts.x_min, max: acts.x_max, data: unpack(acts.x) };
  acts.x.channelMax = channelMax(acts.x.data);
  let networkMax = Math.max(Math.abs(acts.x.min), Math.abs(acts.x.max));
  for (const entry of acts.layers) {
    networkMax = Math.max(networkMax, Math.abs(entry.min), Math.abs(entry.max));
    if (!entry.data) continue;
    entry.data = unpack(entry.data);
    entry.channelMax = channelMax(entry.data);
  }
  // The output's own column (a softmax, a segmentation mask), the last of the page.
  if (acts.head) {
    acts.head.data = unpack(acts.head.data);
    acts.head.channelMax = channelMax(acts.head.data);
    acts.layers.push(acts.head);
  }
  acts.networkMax = networkMax;
  return acts;
}

function updateLegend() {
  drawLegend($("#scale-legend"), true);
  const range = state.mode === "network" ? `±${fmt(state.acts.networkMax)} for every layer`
    : state.mode === "channel" ? "±(largest |value| of each channel)" : "±(largest |value| of each layer)";
  $("#scale-text").textContent = `white = 0, blue = positive, red = negative; range ${range}. `
    + "Probabilities: dark = 0, bright = 1.";
}

async function checkWeights() {
  panels.showFreshness(await getJSON("/api/weights"));
}

async function reloadWeights() {
  status("reloading the weights…");
  await postJSON("/api/reload");
  window.location.reload(); // everything shown may change: layers, facts, numbers
}

async function selectInput(key) {
  status("computing…");
  const params = { input: key };
  if (state.depth !== null) params.depth = state.depth;
  const asked = (state.asked = (state.asked || 0) + 1);
  const acts = await getJSON("/api/activations", params);
  if (asked !== state.asked) return; // a newer input or slice was asked for meanwhile
  state.acts = decode(acts);
  state.input = key;
  panels.markThumb(key);
  panels.showInput(state);
  panels.showPrediction(state, (k) => guarded(() => pickNeuron(state.info.layers.length - 1, [k])));
  panels.showSlice(state);
  drawOverview(state);
  updateLegend();
  if (state.selection) await pickNeuron(state.selection.layer, state.selection.position);
  else if (state.zoom) showZoom(state, state.zoom.layer, state.zoom.channel, onNeuron);
  if ($("#explain-show").checked) await explain();
  status("");
  document.body.dataset.depth = state.depth === null ? "" : String(state.depth);
  await checkWeights();
}

// The slider moved: the same input, every volume at its slice for the new depth.
async function moveSlider() {
  state.depth = Number($("#depth").value);
  if (state.selection && state.selection.position.length === 4) {
    const layer = state.info.layers[state.selection.layer];
    const slice = Math.min(layer.depth - 1, Math.floor(state.depth * layer.depth / state.info.input_depth));
    state.selection.position[1] = slice;
  }
  if (state.input) await selectInput(state.input);
}

function onNeuron(layer, position) {
  if (layer >= 0) guarded(() => pickNeuron(layer, position));
}

async function pickChannel(layer, channel) {
  state.zoom = { layer, channel };
  if (layer < 0) {
    state.selection = state.feeds = null;
    showZoom(state, layer, channel, onNeuron);
    clear($("#arithmetic"));
    markSelection(state);
    return;
  }
  // Start on the channel's strongest neuron, as a reader's eye would.
  const entry = state.acts.layers[layer];
  const [, h, w] = entry.data.shape;
  const values = entry.data.data.subarray(channel * h * w, (channel + 1) * h * w);
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  await pickNeuron(layer, positionOf(state, layer, channel, Math.floor(best / w), best % w));
}

async function pickNeuron(layer, position) {
  const params = { input: state.input, layer, c: position[0] };
  const axes = ["z", "y", "x"].slice(4 - position.length); // a map: c, then its position
  axes.forEach((axis, i) => { params[axis] = position[i + 1]; });
  const view = await getJSON("/api/neuron", params);
  state.selection = { layer, position };
  const info = state.info.layers[layer];
  state.feeds = view.kind === "conv" ? { source: info.source, channels: view.in_channels }
    : position.length >= 2 && info.source !== null && info.kind !== "mask"
      ? { source: info.source, channels: [position[0], position[0] + 1] } : null;
  if (position.length >= 2) {
    state.zoom = { layer, channel: position[0] };
    showZoom(state, layer, position[0], onNeuron);
  } else {
    clear($("#zoom"));
  }
  showNeuron(state, view);
  markSelection(state);
}

async function pickLayer(index) {
  const layer = state.info.layers[index];
  if (layer.kind === "conv" || layer.kind === "linear") {
    state.selection = state.feeds = null;
    markSelection(state);
    showFilters(state, await getJSON("/api/filters", { layer: index }));
  } else if (layer.shape.length >= 2) {
    await pickChannel(index, 0);
  } else {
    await pickNeuron(index, [0]);
  }
}

async function explain() {
  if (!$("#explain-show").checked) {
    panels.hideExplanation();
    return;
  }
  status("explaining…");
  const params = { input: state.input, method: $("#explain-method").value };
  if (state.depth !== null) params.depth = state.depth;
  if ($("#explain-class").value !== "") params.target = $("#explain-class").value;
  const heat = await getJSON("/api/explain", params);
  panels.showExplanation(heat, unpack(heat.map));
  status("");
}

// A class of the mask's legend clicked: explain that class's region on the input.
async function explainClass(k) {
  $("#explain-class").value = String(k);
  $("#explain-show").checked = true;
  await explain();
}

async function moreThumbs() {
  const listing = await getJSON("/api/inputs", { offset: state.galleryOffset, limit: 60 });
  state.galleryOffset += listing.items.length;
  panels.addThumbs(listing, (key) => guarded(() => selectInput(key)));
}

async function start() {
  state.info = await getJSON("/api/model");
  const info = state.info;
  document.title = `${info.run} · cnnkit explorer`;
  if (info.input_depth > 1) {
    state.depth = Math.floor(info.input_depth / 2);
    $("#depth").max = String(info.input_depth - 1);
    $("#depth").value = String(state.depth);
    $("#depth-control").hidden = false;
    $("#depth").addEventListener("input", () => guarded(moveSlider));
  }
  panels.setupUpload(info);
  panels.showRunInfo(info);
  panels.showFacts(info);
  panels.setupExplain(info, () => guarded(explain));
  panels.setupMask(state, (k) => guarded(() => explainClass(k)));
  buildOverview(info, {
    channel: (layer, channel) => guarded(() => pickChannel(layer, channel)),
    neuron: (layer, position) => guarded(() => pickNeuron(layer, position)),
    layer: (index) => guarded(() => pickLayer(index)),
  });
  $("#scale-mode").addEventListener("change", () => {
    state.mode = $("#scale-mode").value;
    drawOverview(state);
    updateLegend();
    if (state.zoom) showZoom(state, state.zoom.layer, state.zoom.channel, onNeuron);
  });
  $("#more").addEventListener("click", () => guarded(moreThumbs));
  $("#reload").addEventListener("click", () => guarded(reloadWeights));
  panels.showFreshness(info);
  setInterval(() => guarded(checkWeights), 15000); // a training may replace the weights any time
  $("#upload").addEventListener("change", () => guarded(async () => {
    const file = $("#upload").files[0];
    if (!file) return;
    status("uploading…");
    const result = await uploadImage(file);
    $("#upload").value = "";
    await selectInput(result.input);
  }));
  if (info.test_error) status(info.test_error, true);
  await moreThumbs();
  if (info.test_images > 0) await selectInput("test:0");
  document.body.dataset.ready = "true";
}

guarded(start);
