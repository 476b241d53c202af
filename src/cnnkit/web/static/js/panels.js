// The side panels: run info, the input gallery, the prediction, the explanation overlay
// and the model facts.

import { unpack } from "./api.js";
import { classColour, css, diverging, drawLegend, drawMap, fmt, sequential } from "./colors.js";
import { clear, el, $ } from "./dom.js";

export function showRunInfo(info) {
  const summary = info.summary || {};
  const acc = summary.test_accuracy !== undefined ? `test accuracy ${(100 * summary.test_accuracy).toFixed(1)}%`
    : summary.test_miou !== undefined ? `test mIoU ${summary.test_miou.toFixed(3)}`
      : summary.test_mse !== undefined ? `test MSE ${fmt(summary.test_mse)}` : null;
  const file = info.weights_files[0];
  const weights = file ? `${info.weights} weights of ${when(file.modified)}` : `${info.weights} weights`;
  const parts = [info.run, `${info.model} on ${info.data} (${info.task})`, weights,
    `input ${info.input_size.join("×")}`, acc].filter(Boolean);
  clear($("#run-info")).append(...parts.map((p) => el("span", {
    text: p, title: p === weights && file ? `${file.name}, ${file.size} bytes, SHA-256 ${file.sha256}` : null,
  })));
}

// A server time (ISO 8601, UTC) in the reader's own time zone.
export function when(iso) {
  return new Date(iso).toLocaleString();
}

// The banner saying that the weights on disk are not the ones shown (a training replaced them).
export function showFreshness(fresh) {
  $("#stale").hidden = !fresh.stale;
  if (!fresh.stale) return;
  const changed = fresh.weights_files.filter((f) => f.stale).map((f) => f.name).join(", ");
  $("#stale-text").textContent = `${changed} changed on disk since it was loaded (${when(fresh.loaded)}): `
    + "the numbers shown come from the old weights.";
}

export function addThumbs(listing, onPick) {
  const gallery = $("#gallery");
  for (const item of listing.items) {
    const name = item.class === null ? item.input.replace("test:", "#") : item.class;
    gallery.append(el("button", {
      class: "thumb", type: "button", title: `${item.input}: ${name}`,
      data: { input: item.input }, on: { click: () => onPick(item.input) },
    }, [el("img", { src: item.image, alt: name }), el("span", { text: name })]));
  }
  $("#gallery-count").textContent = `(${listing.total} inputs)`;
  $("#more").hidden = listing.offset + listing.items.length >= listing.total;
}

export function markThumb(key) {
  document.querySelectorAll(".thumb").forEach((t) => t.classList.toggle("current", t.dataset.input === key));
}

export function showInput(state) {
  const { acts, info } = state;
  const img = new Image();
  img.onload = () => {
    const canvas = $("#input-canvas");
    canvas.width = img.width;
    canvas.height = img.height;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
  };
  img.src = acts.image;
  const truth = acts.label !== null ? `true class ${acts.class}`
    : acts.input.startsWith("upload:") ? "uploaded" : "test input";
  const predicted = acts.predicted === null ? []
    : [" · predicted ", el("strong", { id: "predicted", text: info.classes[acts.predicted] })];
  clear($("#input-caption")).append(el("strong", { text: acts.input }), ` · ${truth}`, ...predicted);
  showMask(state);
}

// A segmentation's classes over the input, predicted or true (background left clear).
function showMask(state) {
  const canvas = $("#mask-canvas");
  const head = state.acts.head;
  const isMask = Boolean(head && state.info.output_kind === "mask");
  const truth = state.acts.truth && state.acts.truth.mask ? state.acts.truth.mask : null;
  $("#mask-mode").querySelector("option[value=truth]").disabled = !truth;
  const mode = $("#mask-mode").value === "truth" && !truth ? "predicted" : $("#mask-mode").value;
  canvas.hidden = !isMask || mode === "none";
  canvas.dataset.shows = canvas.hidden ? "" : mode;
  if (canvas.hidden) return;
  const data = mode === "truth" ? (truth.decoded ||= unpack(truth)) : head.data;
  const [, h, w] = data.shape;
  const k = state.info.classes.length;
  drawMap(canvas, data.data, 0, h, w,
    (v) => (v === 0 || v >= k ? [0, 0, 0, 0] : [...classColour(state.info, v), 130]));
}

// The colour of each class (a click explains that class's region), for segmentation runs.
export function setupMask(state, onClass) {
  const info = state.info;
  $("#mask-controls").hidden = info.output_kind !== "mask";
  if (info.output_kind !== "mask") return;
  const legend = clear($("#mask-legend"));
  info.classes.forEach((name, k) => legend.append(el("button", {
    class: "legend-item", type: "button", role: "listitem", data: { class: k },
    title: `${name}${k === 0 ? " (not drawn over the input)" : ""}: click to explain its region`,
    on: { click: () => onClass(k) },
  }, [el("span", { class: "swatch", style: { background: css(classColour(info, k)) } }),
    el("span", { class: "legend-name", text: name })])));
  $("#mask-mode").addEventListener("change", () => state.acts && showMask(state));
}

// The volume's slice shown, and the slider's place.
export function showSlice(state) {
  if (state.depth === null) return;
  $("#depth-text").textContent = `${state.depth + 1} of ${state.info.input_depth}`;
}

export function setupUpload(info) {
  const dims = info.input_size.length - 1;
  $("#upload-label").hidden = dims === 1;
  if (dims === 3) {
    $("#upload-text").textContent = "Upload a NIfTI volume";
    $("#upload").accept = ".nii,.nii.gz,.gz";
  }
  const hints = {
    probability: "Class probabilities (softmax of the logits). Click a class for the softmax arithmetic.",
    share: "The share of positions predicted as each class (the mask's colours, drawn over the input). "
      + "Click the mask column's map for the scores of a position.",
    value: "The values the model predicts.",
  };
  $("#prediction-hint").textContent = hints[{ probabilities: "probability", mask: "share", values: "value" }[info.output_kind]]
    || "This model's output is an image: see the last layer.";
}

// Per output: a probability (bar and logit), a share of positions (bar in the class colour)
// or a value (and the true one, for a test input).
export function showPrediction(state, onClass) {
  const { acts, info } = state;
  if (acts.scores === null) {
    clear($("#prediction"));
    return;
  }
  const truth = acts.truth && acts.truth.values ? acts.truth.values : null;
  const rows = info.classes.map((name, k) => {
    const p = acts.scores[k];
    const bar = acts.score_kind === "value" ? null : el("span", { class: "class-bar" }, el("span", { style: {
      width: `${(100 * p).toFixed(1)}%`,
      background: css(acts.score_kind === "share" ? classColour(info, k) : sequential(0.25 + 0.6 * p)) } }));
    const extra = acts.score_kind === "probability" ? `logit ${fmt(acts.logits[k])}`
      : truth ? `true ${fmt(truth[k])}` : "";
    return el("button", {
      class: `class-row${k === acts.predicted ? " top" : ""}`, type: "button",
      data: { class: k }, on: { click: () => acts.score_kind === "probability" && onClass(k) },
    }, [
      el("span", { class: "class-name", text: name, title: name }),
      bar || el("span"),
      el("span", { class: "class-p", text: acts.score_kind === "value" ? fmt(p) : `${(100 * p).toFixed(1)}%` }),
      el("span", { class: "class-logit", text: extra }),
    ]);
  });
  clear($("#prediction")).append(...rows);
}

export function setupExplain(info, onChange) {
  if (info.explain_error) {
    $("#explain-show").disabled = true;
    $("#explain-note").textContent = info.explain_error;
  }
  const method = $("#explain-method");
  for (const m of info.methods) method.append(el("option", { value: m, text: m }));
  method.value = info.methods.includes("gradcam") ? "gradcam" : info.methods[0];
  const target = $("#explain-class");
  target.append(el("option", { value: "", text: info.output_kind === "values" ? "the first output" : "the predicted class" }));
  info.classes.forEach((c, k) => target.append(el("option", { value: k, text: c })));
  for (const id of ["#explain-method", "#explain-class", "#explain-show"]) $(id).addEventListener("change", onChange);
  $("#explain-opacity").addEventListener("input", () => {
    $("#overlay-canvas").style.opacity = $("#explain-opacity").value / 100;
  });
  $("#overlay-canvas").style.opacity = $("#explain-opacity").value / 100;
}

// Draw the heat map over the input: signed maps on the diverging scale, others sequential.
export function showExplanation(heat, map) {
  const canvas = $("#overlay-canvas");
  const [h, w] = map.shape;
  const signed = heat.min < 0;
  const m = Math.max(Math.abs(heat.min), Math.abs(heat.max));
  const span = heat.max - heat.min || 1;
  drawMap(canvas, map.data, 0, h, w, signed ? (v) => diverging(v, m) : (v) => sequential((v - heat.min) / span));
  canvas.hidden = false;
  drawLegend($("#explain-legend"), signed);
  // A segmentation's class is explained over its region (Seg-Grad-CAM's score).
  const region = heat.region === undefined ? ""
    : heat.region > 0 ? ` (its region: the ${(100 * heat.region).toFixed(1)}% of positions predicted as ${heat.class})`
      : ` (no position is predicted as ${heat.class}: its score over the whole input)`;
  $("#explain-note").textContent = `${heat.method} for class ${heat.class}${region}: `
    + (signed ? `blue raises the score, red lowers it (±${fmt(m)})` : `bright is high (${fmt(heat.min)} … ${fmt(heat.max)})`)
    + (heat.float_model ? "; computed on the float model this int8 model was quantised from" : "");
}

export function hideExplanation() {
  $("#overlay-canvas").hidden = true;
  $("#explain-note").textContent = "";
}

function rf(v) {
  return v === null || v === undefined ? "–" : Array.isArray(v) ? v.join("×") : String(v);
}

function compression(c) {
  if (!c) return [el("p", { class: "note", text: "Not compressed: a trained run as cnnkit train wrote it." })];
  const out = [el("h3", { text: "Compression" })];
  if (c.measured && c.measured.models) {
    const names = Object.keys(c.measured.models);
    out.push(el("p", { text: `From ${c.measured.from}: pruned ${c.measured.prune ?? "–"} (${c.measured.criterion}), `
      + `quantised ${c.measured.quantize ?? "no"} (measured by cnnkit compress).` }));
    out.push(el("table", { class: "facts" }, [
      el("tr", {}, ["model", "accuracy", "params", "MACs", "bytes", "latency b1 ms"].map((t) => el("th", { text: t }))),
      ...names.map((n) => {
        const r = c.measured.models[n];
        return el("tr", {}, [n, (100 * r.accuracy).toFixed(1) + "%", r.params.toLocaleString(),
          r.macs === null ? "–" : r.macs.toLocaleString(), r.bytes.toLocaleString(),
          (1000 * r.latency_b1).toFixed(2)].map((t) => el("td", { text: t })));
      }),
    ]));
  }
  if (c.pruned_groups.length) {
    out.push(el("p", { text: "Pruned channel groups (channels coupled through layers are pruned together):" }));
    out.push(el("table", { class: "facts" }, [
      el("tr", {}, ["step", "layers", "kept", "kept channels"].map((t) => el("th", { text: t }))),
      ...c.pruned_groups.map((g) => el("tr", {}, [String(g.step), g.members.join(", "), `${g.kept} of ${g.channels}`,
        g.kept_indices.join(" ")].map((t) => el("td", { text: t })))),
    ]));
  }
  if (c.int8) {
    const cfg = c.int8.config || {};
    out.push(el("p", { text: `int8: ${Object.keys(c.int8.layers).length} layers quantised (backend ${cfg.backend ?? "?"}, `
      + `observer ${cfg.observer ?? "?"}, ${cfg.per_channel ? "per-channel" : "per-tensor"} weights).` }));
    out.push(el("table", { class: "facts" }, [
      el("tr", {}, ["layer", "weights", "weight scale", "output scale", "zero point"].map((t) => el("th", { text: t }))),
      ...Object.entries(c.int8.layers).map(([n, q]) => el("tr", {}, [n, q.weight_dtype,
        q.weight_scale_min === q.weight_scale_max ? fmt(q.weight_scale_min) : `${fmt(q.weight_scale_min)} … ${fmt(q.weight_scale_max)}`,
        fmt(q.output_scale), String(q.output_zero_point)].map((t) => el("td", { text: t })))),
    ]));
  }
  return out;
}

export function showFacts(info) {
  const t = info.totals;
  const head = ["#", "layer", "type", "output", "params", "MACs", "receptive field", "jump"];
  const rows = info.layers.filter((l) => l.kind !== "softmax").map((l) => {
    const f = l.facts || {};
    return el("tr", {}, [String(l.index), l.name, l.type, l.shape.join("×"),
      f.params ? f.params.toLocaleString() : "–", f.macs ? f.macs.toLocaleString() : "–",
      rf(f.receptive_field), rf(f.jump)].map((v) => el("td", { text: v })));
  });
  clear($("#facts")).append(
    el("p", { text: `${t.total_params.toLocaleString()} parameters, ${t.total_macs.toLocaleString()} `
      + `multiply-accumulates per image, peak activation memory ${(t.peak_activation_bytes / 1e3).toFixed(1)} KB`
      + (t.from_float_model ? " (of the float model this int8 model was quantised from)" : "")
      + ". Receptive field and jump are in input pixels (cnnkit summary)." }),
    el("div", { class: "facts-wrap" }, el("table", { class: "facts" }, [
      el("tr", {}, head.map((h) => el("th", { text: h }))), ...rows])),
    ...compression(info.compression),
  );
}
