// The playground page: the form, the request it makes, and the picture forming from the previews as they come.
// Each request is a job of the jobs service: its id is kept in localStorage until the next one, so that a tab
// opened later shows the job of a closed one (still running: watched; ended: its result or why not).

import { jobRun, loadDescription, loadSettings, RequestFailed, startRun } from "./api.js";
import { clearErrors, showError } from "./errors.js";
import { MaskPainter } from "./masks.js";
import { buildControls } from "./params.js";
import { StylePicker } from "./styles.js";

const SAMPLE_PHOTO = { url: "samples/tubingen.jpg", name: "tubingen.jpg" };
const REMEMBERED_JOB = "playground.job";  // localStorage: the id of the last job this browser submitted here
const $ = (id) => document.getElementById(id);

const state = { content: null, parameters: new Map(), running: null, resultUrl: null, jobs: true };

const styles = new StylePicker({
  presetList: $("preset-list"), uploadInput: $("style-files"), uploadList: $("upload-list"),
  onChange: () => painter.setStyles(styles.styles()),
});
const painter = new MaskPainter({
  canvas: $("mask-canvas"), styleChoices: $("mask-styles"), emptyNote: $("mask-styles-empty"),
  brushSize: $("brush-size"), brushState: $("brush-state"),
});

async function start() {
  wireControls();
  let loading = "The playground's settings";
  try {
    state.jobs = (await loadSettings()).jobs;
    $("stop").textContent = state.jobs ? "Cancel" : "Stop watching";
    $("jobs-hint").hidden = !state.jobs;
    if (state.jobs && localStorage.getItem(REMEMBERED_JOB)) {
      follow(async () => jobRun(localStorage.getItem(REMEMBERED_JOB)), { resumed: true });
    }
    loading = "The model's description";
    describe(await loadDescription());
  } catch (error) {
    showError(null, `${loading} could not be loaded: ${error.message}`);
  } finally {
    $("presets-loading").hidden = true;
  }
}

function describe(description) {
  state.parameters = buildControls(description.parameters, $("main-params"), $("more-params"));
  styles.showPresets(description.presets);
  const { max_styles: maxStyles } = description.limits;
  $("styles-hint").textContent += ` Up to ${maxStyles} styles in all.`;
  if (description.weights === "random") {
    $("weights-note").hidden = false;
    $("weights-note").textContent = "This server runs VGG19 with random weights, for tests: its pictures show "
      + "where each style went, not what a trained network paints.";
  }
}

function wireControls() {
  $("content").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) {
      setContent(file, file.name);
    }
  });
  $("use-sample").addEventListener("click", async () => {
    const response = await fetch(SAMPLE_PHOTO.url);
    const file = new File([await response.blob()], SAMPLE_PHOTO.name, { type: "image/jpeg" });
    $("content").value = "";
    setContent(file, `${SAMPLE_PHOTO.name} (the sample photo)`);
  });
  $("init_image").addEventListener("change", () => {
    const init = $("param-init");
    if (init && $("init_image").files.length) {
      init.value = "image";
    }
  });
  for (const radio of document.querySelectorAll("input[name=brush-mode]")) {
    radio.addEventListener("change", () => painter.setErasing(radio.value === "erase" && radio.checked));
  }
  $("brush-size").addEventListener("input", () => painter.draw());
  $("clear-mask").addEventListener("click", () => painter.clearCurrent());
  $("job").addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  $("stop").addEventListener("click", async () => {
    $("stop").disabled = true;
    try {
      await state.running?.cancel();
    } catch (error) {
      showFailure(error);
      $("stop").disabled = state.running === null;  // the job runs on: the cancel may be tried again
    }
  });
}

function setContent(file, label) {
  state.content = file;
  $("content-chosen").textContent = `Photo: ${label}.`;
  const image = new Image();
  image.alt = "";
  image.addEventListener("load", () => painter.setPhoto(image));
  image.addEventListener("error", () => painter.setStyles(styles.styles()));
  image.src = URL.createObjectURL(file);
}

async function request() {
  const form = new FormData();
  if (state.content) {
    form.append("content", state.content, state.content.name);
  }
  styles.appendTo(form);
  (await painter.maskBlobs()).forEach((mask, index) => form.append(`mask_${index + 1}`, mask, `mask_${index + 1}.png`));
  const [initImage] = $("init_image").files;
  if (initImage) {
    form.append("init_image", initImage, initImage.name);
  }
  for (const [name, value] of state.parameters) {
    const text = value();
    if (text !== null) {
      form.append(name, text);
    }
  }
  form.append("stream", "true");
  form.append("preview", "true");
  return form;
}

function submit() {
  clearErrors();
  announce("Sending the request.");
  return follow(async () => {
    const run = await startRun(await request(), { jobs: state.jobs });
    if (run.id !== null) {
      localStorage.setItem(REMEMBERED_JOB, run.id);
    }
    return run;
  });
}

/** Starts a run with begin() and shows it to its end: progress, then the result, the failure or the cancel. */
async function follow(begin, { resumed = false } = {}) {
  $("start").disabled = true;
  showProgress({ value: 0, text: resumed ? "Looking up the job of your last visit…" : "Waiting for the server…" });
  try {
    const run = await begin();
    state.running = run;
    $("stop").disabled = false;
    const onProgress = progressShown();
    for await (const event of run.events) {
      if (event.event === "progress") {
        onProgress(event);
      } else if (event.event === "queued" || event.event === "started") {
        showProgress({ value: 0, text: event.event === "queued" ? "Queued: waiting for the server…" : "Started." });
      } else if (event.event === "done") {
        showResult(event, await run.result(event));
      } else if (event.event === "error") {
        localStorage.removeItem(REMEMBERED_JOB);  // shown now, and ended: a later visit has nothing to show
        throw new RequestFailed(event);
      } else if (event.event === "canceled") {
        showCanceled(run.id);
      }
    }
  } catch (error) {
    if (resumed && error.code === 404) {
      forgetJob("The job of your last visit is no longer on the server (its results are kept for a day): "
        + "it is forgotten.");
    } else {
      showFailure(error);
    }
  } finally {
    state.running = null;
    $("start").disabled = false;
    $("stop").disabled = true;
  }
}

/** A progress handler that announces each new scale (not every line, which would drown a screen reader). */
function progressShown() {
  let lastScale = 0;
  return (event) => {
    const total = event.loss?.total;
    showProgress({ value: event.step / event.steps,
                   text: `Step ${event.step} of ${event.steps}, scale ${event.scale} of ${event.scales}`
                     + (total === undefined ? "" : `, loss ${total.toPrecision(4)}`) });
    if (event.scale !== lastScale) {
      lastScale = event.scale;
      announce(`Working on scale ${event.scale} of ${event.scales}.`);
    }
    if (event.preview) {
      const preview = $("preview");
      preview.src = `data:image/jpeg;base64,${event.preview}`;
      preview.alt = `Preview at step ${event.step} of ${event.steps}`;
      preview.hidden = false;
    }
  };
}

function showResult(done, image) {
  if (state.resultUrl) {
    URL.revokeObjectURL(state.resultUrl);
  }
  state.resultUrl = URL.createObjectURL(image);
  const final = $("final");
  final.src = state.resultUrl;
  final.hidden = false;
  const summary = `${done.width}×${done.height} px, ${done.steps} steps in ${done.seconds.toFixed(1)} s `
    + `(stopped: ${done.stop_reason}; ${done.precision})`;
  $("final-caption").textContent = `The result: ${summary}. Final loss ${done.loss.final.total.toPrecision(4)}.`;
  const download = $("download");
  download.href = state.resultUrl;
  download.download = `stylised.${done.format === "jpeg" ? "jpg" : done.format}`;
  download.hidden = false;
  showProgress({ value: 1, text: `Done: ${summary}.` });
  announce(`Done: ${summary}. The result and a download link are below the progress bar.`);
}

function showCanceled(id) {
  localStorage.removeItem(REMEMBERED_JOB);
  showProgress({ value: $("progress").value, text: `Canceled: the server stopped job ${id}.` });
  announce("Canceled: the server stopped the work.");
}

function forgetJob(text) {
  localStorage.removeItem(REMEMBERED_JOB);
  showProgress({ value: 0, text });
  announce(text);
}

function showFailure(error) {
  if (error.name === "AbortError") {
    showProgress({ value: 0, text: "Stopped watching. The server finishes the work anyway." });
    announce("Stopped watching.");
    return;
  }
  const failure = error instanceof RequestFailed ? error
    : new RequestFailed({ code: 0, type: "NetworkError", message: `the playground did not answer (${error.message})` });
  const slot = showError(failure.field, failure.message);
  showProgress({ value: 0, text: `Refused: ${failure.message}` });
  announce(`The request was refused${failure.field ? ` (${failure.field})` : ""}: ${failure.message}`);
  slot.scrollIntoView({ block: "center" });
}

function showProgress({ value, text }) {
  $("progress").value = value;
  $("progress-text").textContent = text;
}

function announce(text) {
  $("announcer").textContent = text;
}

start();
