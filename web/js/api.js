// The page's two calls, both to its own origin: nginx (scripts/playground.py) adds TorchServe's keys.

const PREDICT_URL = "predictions/style_transfer";
const DESCRIPTION_URL = "description";
// scripts/playground.py renews TorchServe's keys before they expire, then reloads nginx: a request that comes
// in between is refused as InvalidKeyException. Sent again once, after this long, it gets the new key.
const KEY_RENEWAL_WAIT_MS = 1000;

/** A refused request, as CONTRACT.md's error object: {code, type, message, field}. */
export class RequestFailed extends Error {
  constructor({ code, type, message, field }) {
    super(message);
    this.code = code;
    this.type = type;
    this.field = field ?? null;
  }
}

/** The handler's description of the model: {presets, parameters, limits, weights, device}. */
export async function loadDescription() {
  const response = await fetchWithFreshKey(DESCRIPTION_URL, {});
  if (!response.ok) {
    throw await failureOf(response);
  }
  const [model] = await response.json();
  return model.customizedMetadata;
}

/**
 * Sends one job (FormData with stream=true) and reads its progress lines as they come: onProgress(event) for
 * each, and the "done" event as the result. Throws RequestFailed for a refusal or a failure mid-stream.
 */
export async function runJob(form, { onProgress, signal }) {
  const response = await fetchWithFreshKey(PREDICT_URL, { method: "POST", body: form, signal });
  if (!response.ok) {
    throw await failureOf(response);
  }
  for await (const event of jsonLines(response.body)) {
    if (event.event === "progress") {
      onProgress(event);
    } else if (event.event === "done") {
      return event;
    } else if (event.event === "error") {
      throw new RequestFailed(event);
    }
  }
  throw new RequestFailed({ code: 0, type: "StreamEnded", message: "the answer ended before the result came" });
}

async function fetchWithFreshKey(url, options) {
  const response = await fetch(url, options);
  if (response.status === 400 && (await failureOf(response.clone())).type === "InvalidKeyException") {
    await new Promise((resolve) => setTimeout(resolve, KEY_RENEWAL_WAIT_MS));
    return fetch(url, options);
  }
  return response;
}

/** The JSON objects of an NDJSON body, one a line, as their lines arrive. */
async function* jsonLines(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) {
      break;
    }
    const lines = (pending + value).split("\n");
    pending = lines.pop();
    yield* lines.filter((line) => line.trim()).map((line) => JSON.parse(line));
  }
  if (pending.trim()) {
    yield JSON.parse(pending);
  }
}

/** The error object of a refused request: the server's JSON where there is one, else words for its status. */
async function failureOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (typeof body.message === "string") {
      return new RequestFailed({ code: body.code ?? response.status, type: body.type, message: body.message,
                                 field: body.field });
    }
  } catch {
    // not JSON: nginx's own pages, or TorchServe's empty 413
  }
  return new RequestFailed({ code: response.status, type: "HttpError", message: statusInWords(response.status) });
}

function statusInWords(status) {
  if (status === 413) {
    return "the request is larger than the server accepts (its max_request_size): send smaller images";
  }
  if (status === 502 || status === 504) {
    return `no answer from TorchServe (HTTP ${status}): is the server running?`;
  }
  return `the server answered HTTP ${status}`;
}
