// Colour scales and drawing of maps on canvases.
//
// Activations use a diverging scale (as CNN Explainer does): white is 0, blue positive,
// red negative, and the range is symmetric, +-m, so equal colours mean equal values.

const DIVERGING = [[178, 24, 43], [239, 138, 98], [247, 247, 247], [103, 169, 207], [33, 102, 172]];
const SEQUENTIAL = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];

function interpolate(stops, t) {
  const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2);
  const f = x - i;
  return stops[i].map((a, k) => Math.round(a + f * (stops[i + 1][k] - a)));
}

// Value v on the range [-m, m] -> [r, g, b].
export function diverging(v, m) {
  return interpolate(DIVERGING, m > 0 ? 0.5 + v / (2 * m) : 0.5);
}

// t in [0, 1] -> [r, g, b] (an inferno-like scale for explanation heat maps).
export function sequential(t) {
  return interpolate(SEQUENTIAL, t);
}

// Class k of a segmentation in its colour (the run's palette, as cnnkit predict's overlays).
export function classColour(info, k) {
  return info.palette[Math.round(k)] || [128, 128, 128];
}

export function css([r, g, b]) {
  return `rgb(${r}, ${g}, ${b})`;
}

// Text colour that reads on background [r, g, b].
export function ink([r, g, b]) {
  return 0.299 * r + 0.587 * g + 0.114 * b > 140 ? "#222" : "#fff";
}

// Draw an h x w map from data[offset ...] with colour(value) -> [r, g, b, a?].
export function drawMap(canvas, data, offset, h, w, colour) {
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    const c = colour(data[offset + i]);
    image.data.set([c[0], c[1], c[2], c.length > 3 ? c[3] : 255], 4 * i);
  }
  ctx.putImageData(image, 0, 0);
}

// A horizontal legend bar for the diverging (signed) or sequential scale.
export function drawLegend(canvas, signed) {
  const ctx = canvas.getContext("2d");
  for (let x = 0; x < canvas.width; x++) {
    const t = x / (canvas.width - 1);
    ctx.fillStyle = css(signed ? diverging(2 * t - 1, 1) : sequential(t));
    ctx.fillRect(x, 0, 1, canvas.height);
  }
}

// Numbers as people read them: 4 significant digits, exponents only when needed.
export function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
  return Number(v.toPrecision(4)).toString();
}

// Six significant digits: what float32 arithmetic guarantees, so the same number computed
// in two orders (the model's kernel, the float64 sum shown) reads the same.
export function fmtFull(v) {
  return Number(v.toPrecision(6)).toString();
}

// Short enough for a grid cell: two decimals (the full value is in the cell's tooltip).
export function fmtCell(v) {
  const a = Math.abs(v);
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  const s = v.toFixed(2);
  return s === "-0.00" ? "0.00" : s;
}
