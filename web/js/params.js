// The parameter controls, built from the model's description: each parameter's name, default, bounds or
// choices and meaning come from the server. The page decides only which it shows first and which it sets itself.

import { element } from "./dom.js";

export const MAIN_PARAMETERS = ["size", "steps", "style_weight", "content_weight", "style_scale", "preserve_color",
                                "init"];
// Set by the page: it always streams with previews, and the style picker sends the presets.
const SET_BY_PAGE = new Set(["stream", "preview", "response", "presets"]);

/**
 * One control per parameter, in `main` those of MAIN_PARAMETERS and in `more` the rest. Returns a Map from name
 * to a function giving the value to send: the control's text where it differs from the default, else null
 * (the server's default applies). Values go as plain form fields, which the server reads as their types.
 */
export function buildControls(parameters, main, more) {
  const values = new Map();
  for (const parameter of parameters) {
    if (SET_BY_PAGE.has(parameter.name)) {
      continue;
    }
    const { field, value } = control(parameter);
    (MAIN_PARAMETERS.includes(parameter.name) ? main : more).append(field);
    values.set(parameter.name, value);
  }
  return values;
}

function control(parameter) {
  const { name, schema, doc, allowed } = parameter;
  const fallback = parameter.default ?? null; // TorchServe leaves out a null default
  const field = element("div", { className: "field" });
  const id = `param-${name}`;
  const label = element("label", { htmlFor: id, textContent: name });
  const hint = element("p", { id: `hint-${name}`, className: "hint", textContent: `${doc}: ${allowed}` });
  const error = element("p", { id: `error-${name}`, className: "field-error", hidden: true });
  let input;
  let value;
  if (schema.type === "boolean") {
    input = element("input", { type: "checkbox", checked: fallback === true });
    value = () => (input.checked === fallback ? null : String(input.checked));
  } else if (schema.enum) {
    input = element("select");
    for (const option of schema.enum.filter((choice) => typeof choice === "string")) {
      input.append(element("option", { value: option, textContent: option, selected: option === fallback }));
    }
    value = () => (input.value === fallback ? null : input.value);
  } else {
    const shown = asText(fallback);
    input = element("input", { type: "text", value: shown, autocomplete: "off", spellcheck: false });
    input.inputMode = numericMode(schema);
    value = () => (input.value.trim() === shown ? null : input.value.trim());
  }
  Object.assign(input, { id, name });
  input.dataset.field = name;
  input.setAttribute("aria-describedby", `${hint.id} ${error.id}`);
  if (schema.type === "boolean") {
    label.prepend(input, " ");
    field.append(label, hint, error);
  } else {
    field.append(label, input, hint, error);
  }
  return { field, value };
}

/** A default as the user would type it: numbers as written, objects and lists as JSON, null as nothing. */
function asText(value) {
  if (value === null) {
    return "";
  }
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function numericMode(schema) {
  const types = [schema.type].flat();
  if (types.includes("integer")) {
    return "numeric";
  }
  return types.includes("number") ? "decimal" : "text";
}
