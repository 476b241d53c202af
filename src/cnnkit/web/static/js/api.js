// The JSON API of cnnkit serve, and the packed float32 arrays it sends.

export async function getJSON(path, params = {}) {
  const query = new URLSearchParams(params).toString();
  const response = await fetch(query ? `${path}?${query}` : path);
  return answer(response);
}

export async function uploadImage(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  return answer(await fetch("/api/upload", { method: "POST", body: form }));
}

export async function postJSON(path) {
  return answer(await fetch(path, { method: "POST" }));
}

async function answer(response) {
  let body;
  try {
    body = await response.json();
  } catch {
    body = { error: `${response.status} ${response.statusText}` };
  }
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

// {shape, data: base64 of float32 little-endian} -> {shape, data: Float32Array}.
// The bytes are the model's float32 values, so what is shown is exactly what it computed.
export function unpack(packed) {
  const bytes = Uint8Array.from(atob(packed.data), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const data = new Float32Array(bytes.length / 4);
  for (let i = 0; i < data.length; i++) data[i] = view.getFloat32(4 * i, true);
  return { shape: packed.shape, data };
}
