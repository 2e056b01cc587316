// The page's calls, all to its own origin: nginx (scripts/playground.py) adds the credentials (the jobs
// service's token, TorchServe's keys).

const SETTINGS_URL = "playground.json";
const JOBS_URL = "jobs";
const PREDICT_URL = "predictions/style_transfer";
const DESCRIPTION_URL = "description";
const JOB_EVENTS = ["queued", "started", "progress", "done", "error", "canceled"];
const END_EVENTS = ["done", "error", "canceled"];
// scripts/playground.py renews TorchServe's keys before they expire, then reloads nginx: a request that comes
// in between is refused as InvalidKeyException. Sent again once, after this long, it gets the new key.
const KEY_RENEWAL_WAIT_MS = 1000;

/** A refused request, as the API's error object: {code, type, message, field}. */
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
  const [model] = await (await answered(fetchWithFreshKey(DESCRIPTION_URL, {}))).json();
  return model.customizedMetadata;
}

/** What the playground runs: {jobs: true} when the page submits jobs, false when it streams (--jobs off). */
export async function loadSettings() {
  return (await answered(fetch(SETTINGS_URL))).json();
}

/**
 * A run of one request, whichever way the playground sends it: {id, events, result(done), cancel()}. `events`
 * yields {event, ...fields} objects ("queued", "started", "progress", then one of "done", "error", "canceled")
 * and ends after the last; result(done) is the image as a Blob; `id` is the job's id (null when streamed).
 * Throws RequestFailed when the request is refused.
 */
export async function startRun(form, { jobs }) {
  return jobs ? submitJob(form) : streamDirectly(form);
}

async function submitJob(form) {
  const { id } = await (await answered(fetch(JOBS_URL, { method: "POST", body: form }))).json();
  return jobRun(id);
}

/** The run of a submitted job (new, or remembered from an earlier visit): its events replayed from the first. */
export function jobRun(id) {
  const base = `${JOBS_URL}/${encodeURIComponent(id)}`;
  return {
    id,
    events: jobEvents(`${base}/events`, () => whyEventsStopped(base)),
    async result() {
      return (await answered(fetch(`${base}/result`))).blob();
    },
    async cancel() {
      await answered(fetch(`${base}/cancel`, { method: "POST" }));
    },
  };
}

/** The answer of a request, or its failure thrown. */
async function answered(request) {
  const response = await request;
  if (!response.ok) {
    throw await failureOf(response);
  }
  return response;
}

/**
 * The job's server-sent events as they come. The browser's EventSource reconnects by itself (Last-Event-ID) when a
 * connection breaks; it gives up when an answer is not a stream (the job is gone, the jobs service is down), and
 * then whyStopped() says why. The named event "error" (the job failed) shares its name with EventSource's own
 * error (the connection failed): only the job's carries data.
 */
async function* jobEvents(url, whyStopped) {
  const source = new EventSource(url);
  const arrived = [];
  let wake = () => {};
  const push = (item) => {
    arrived.push(item);
    wake();
  };
  for (const name of JOB_EVENTS) {
    source.addEventListener(name, (message) => {
      if (typeof message.data === "string") {
        if (END_EVENTS.includes(name)) {
          source.close();  // the stream ends here: no reconnection
        }
        push({ ...JSON.parse(message.data), event: name });
      } else if (source.readyState === EventSource.CLOSED) {
        push({ event: "closed" });
      }
    });
  }
  try {
    for (;;) {
      if (!arrived.length) {
        await new Promise((resolve) => { wake = resolve; });
        continue;
      }
      const item = arrived.shift();
      if (item.event === "closed") {
        throw await whyStopped();
      }
      yield item;
      if (END_EVENTS.includes(item.event)) {
        return;
      }
    }
  } finally {
    source.close();
  }
}

/** Why a job's events stopped before its end: the job's status says (404: gone), or the status request fails. */
async function whyEventsStopped(base) {
  try {
    await answered(fetch(base));
  } catch (failure) {
    return failure;
  }
  return new RequestFailed({ code: 0, type: "StreamEnded", message: "the job's progress stopped coming; reload "
                             + "the page to watch it again" });
}

/**
 * The request sent directly (FormData with stream=true), its progress lines read as they come. The request is
 * sent when its events are first read, and cancel() works from then on: TorchServe sends no header before the
 * first line, so a request waiting in its queue has no response yet.
 */
function streamDirectly(form) {
  const controller = new AbortController();
  return {
    id: null,
    events: streamedEvents(form, controller.signal),
    async result(done) {
      return new Blob([Uint8Array.from(atob(done.image), (char) => char.charCodeAt(0))],
                      { type: `image/${done.format}` });
    },
    async cancel() {
      controller.abort();  // stops reading only: TorchServe finishes the request anyway
    },
  };
}

async function* streamedEvents(form, signal) {
  const response = await answered(fetchWithFreshKey(PREDICT_URL, { method: "POST", body: form, signal }));
  for await (const event of jsonLines(response.body)) {
    yield event;
    if (END_EVENTS.includes(event.event)) {
      return;
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
    return `no answer from the server (HTTP ${status}): is scripts/serve.sh running?`;
  }
  return `the server answered HTTP ${status}`;
}
