// The styles of a request, in its order (docs/api.md): uploaded paintings as style, style_2, ..., then the
// server's presets chosen, in the order the description lists them. Masks pair with the styles in this order.

import { element } from "./dom.js";

// The project's paintings are the archive's presets by default (scripts/build_mar.py --styles): where a preset
// has one of them as its namesake, the page shows it; other presets are shown by name alone.
const PRESET_PICTURES = "samples/styles/";

export class StylePicker {
  constructor({ presetList, uploadInput, uploadList, onChange }) {
    Object.assign(this, { presetList, uploadList, onChange });
    this.uploads = []; // {key, file, url}
    this.nextKey = 1;
    uploadInput.addEventListener("change", () => {
      for (const file of uploadInput.files) {
        this.uploads.push({ key: `upload-${this.nextKey++}`, file, url: URL.createObjectURL(file) });
      }
      uploadInput.value = "";
      this.showUploads();
      this.onChange();
    });
  }

  showPresets(presets) {
    this.presetList.replaceChildren(...presets.map((preset) => {
      const checkbox = element("input", { type: "checkbox", value: preset.name, id: `preset-${preset.name}` });
      checkbox.addEventListener("change", () => this.onChange());
      const picture = element("img", { src: `${PRESET_PICTURES}${preset.name}.jpg`, alt: "" });
      picture.addEventListener("error", () => picture.remove());
      const label = element("label", { htmlFor: checkbox.id });
      label.append(checkbox, ` ${preset.name} `, element("span", {
        className: "hint", textContent: `${preset.width}×${preset.height}` }));
      const item = element("li");
      item.append(picture, label);
      return item;
    }));
  }

  showUploads() {
    this.uploadList.replaceChildren(...this.uploads.map((upload, index) => {
      const part = index === 0 ? "style" : `style_${index + 1}`;
      const item = element("li");
      const remove = element("button", { type: "button", textContent: "Remove" });
      remove.setAttribute("aria-label", `Remove ${upload.file.name} (${part})`);
      remove.addEventListener("click", () => {
        URL.revokeObjectURL(upload.url);
        this.uploads = this.uploads.filter((other) => other !== upload);
        this.showUploads();
        this.onChange();
      });
      item.append(element("img", { src: upload.url, alt: `Uploaded painting ${upload.file.name}` }),
                  element("span", { textContent: `${part}: ${upload.file.name}` }), remove);
      return item;
    }));
  }

  /** The styles in request order: {key, label}. */
  styles() {
    return [
      ...this.uploads.map((upload) => ({ key: upload.key, label: upload.file.name })),
      ...this.chosenPresets().map((name) => ({ key: `preset-${name}`, label: name })),
    ];
  }

  chosenPresets() {
    return [...this.presetList.querySelectorAll("input:checked")].map((checkbox) => checkbox.value);
  }

  /** Adds the style parts and the presets to a request. */
  appendTo(form) {
    this.uploads.forEach((upload, index) => {
      form.append(index === 0 ? "style" : `style_${index + 1}`, upload.file, upload.file.name);
    });
    const presets = this.chosenPresets();
    if (presets.length) {
      form.append("presets", presets.join(","));
    }
  }
}
