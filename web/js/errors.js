// Errors beside the field they name. The server's error object names a parameter ("size"; "style_layers.relu1_1"
// for a part of one) or a part of the request ("content", "style", "style_2", "mask_1", "presets", "init_image");
// each has a slot, id "error-<name>", next to its control. What names no slot goes to the form's own.

const GENERAL_SLOT = "form-error";

/** Shows `message` next to `field`'s control (marking the control invalid); returns the slot used. */
export function showError(field, message) {
  const slot = slotFor(field);
  slot.textContent = message;
  slot.hidden = false;
  for (const control of document.querySelectorAll(`[aria-describedby~="${slot.id}"]`)) {
    control.setAttribute("aria-invalid", "true");
  }
  return slot;
}

export function clearErrors() {
  for (const slot of document.querySelectorAll(".field-error")) {
    slot.hidden = true;
    slot.textContent = "";
  }
  for (const control of document.querySelectorAll("[aria-invalid]")) {
    control.removeAttribute("aria-invalid");
  }
}

function slotFor(field) {
  if (!field) {
    return document.getElementById(GENERAL_SLOT);
  }
  const name = String(field).split(/[.[]/)[0];
  const candidates = [name, name.startsWith("mask_") && "mask", name.startsWith("style_") && "style"];
  for (const candidate of candidates.filter(Boolean)) {
    const slot = document.getElementById(`error-${candidate}`);
    if (slot) {
      return slot;
    }
  }
  return document.getElementById(GENERAL_SLOT);
}
