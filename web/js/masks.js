// Painting where each style goes: one mask per style, painted over the photo, sent as mask_1, mask_2, ... in the
// order of the styles (docs/api.md). The server reads a mask as grey: white, the style applies; black, it does
// not; transparency counts as white, so every mask is sent opaque, black where nothing is painted.

import { element } from "./dom.js";

const MASK_LONGER_SIDE = 512; // px: the server resamples each mask to the output; finer paint changes little
const COLOURS = ["#e8590c", "#1c7ed6", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599"];
const KEY_STEP = 8; // px the brush moves per arrow key press, 4 times that with Shift

export class MaskPainter {
  constructor({ canvas, styleChoices, emptyNote, brushSize, brushState }) {
    Object.assign(this, { canvas, styleChoices, emptyNote, brushSize, brushState });
    this.context = canvas.getContext("2d");
    this.photo = null;
    this.masks = new Map(); // style key -> canvas: white paint on transparent
    this.styles = [];
    this.current = null;
    this.erasing = false;
    this.cursor = { x: canvas.width / 2, y: canvas.height / 2 };
    this.penDown = false; // keyboard painting
    this.lastPoint = null; // pointer painting
    this.listen();
  }

  /** A new photo: the painting area takes its shape, and paint made for another photo is dropped. */
  setPhoto(image) {
    const scale = Math.min(1, MASK_LONGER_SIDE / Math.max(image.naturalWidth, image.naturalHeight));
    this.canvas.width = Math.round(image.naturalWidth * scale);
    this.canvas.height = Math.round(image.naturalHeight * scale);
    this.photo = image;
    this.masks.clear();
    this.cursor = { x: this.canvas.width / 2, y: this.canvas.height / 2 };
    this.setStyles(this.styles);
  }

  /** The request's styles changed: keep the paint of those still there, offer each to paint for. */
  setStyles(styles) {
    this.styles = styles;
    for (const key of this.masks.keys()) {
      if (!styles.some((style) => style.key === key)) {
        this.masks.delete(key);
      }
    }
    if (!styles.some((style) => style.key === this.current)) {
      this.current = styles[0]?.key ?? null;
    }
    this.showChoices();
    this.draw();
  }

  setErasing(erasing) {
    this.erasing = erasing;
  }

  clearCurrent() {
    this.masks.delete(this.current);
    this.draw();
  }

  /**
   * The masks to send, as PNG blobs in style order: none when nothing is painted; else one per style up to
   * the last painted one, where a style left unpainted covers what the painted styles leave.
   */
  async maskBlobs() {
    const painted = this.styles.map((style) => this.isPainted(style.key));
    const last = painted.lastIndexOf(true);
    if (!this.photo || last < 0) {
      return [];
    }
    const rest = this.rest();
    const masks = this.styles.slice(0, last + 1).map((style, index) => (
      painted[index] ? this.opaque(this.masks.get(style.key)) : rest));
    return Promise.all(masks.map((mask) => new Promise((resolve) => mask.toBlob(resolve, "image/png"))));
  }

  // --- the masks as images ---

  isPainted(key) {
    const mask = this.masks.get(key);
    if (!mask) {
      return false;
    }
    const { data } = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height);
    return data.some((value, index) => index % 4 === 3 && value > 0);
  }

  maskOf(key) {
    if (!this.masks.has(key)) {
      this.masks.set(key, element("canvas", { width: this.canvas.width, height: this.canvas.height }));
    }
    return this.masks.get(key);
  }

  /** The paint on black: white where painted. */
  opaque(mask) {
    const out = this.blank("black");
    out.getContext("2d").drawImage(mask, 0, 0);
    return out;
  }

  /** White where no style is painted, black where one is. */
  rest() {
    const union = this.blank(null);
    const context = union.getContext("2d");
    for (const mask of this.masks.values()) {
      context.drawImage(mask, 0, 0);
    }
    context.globalCompositeOperation = "source-in";
    context.fillStyle = "black";
    context.fillRect(0, 0, union.width, union.height);
    const out = this.blank("white");
    out.getContext("2d").drawImage(union, 0, 0);
    return out;
  }

  blank(fill) {
    const canvas = element("canvas", { width: this.canvas.width, height: this.canvas.height });
    if (fill) {
      const context = canvas.getContext("2d");
      context.fillStyle = fill;
      context.fillRect(0, 0, canvas.width, canvas.height);
    }
    return canvas;
  }

  // --- painting ---

  paint(from, to) {
    if (!this.photo || !this.current) {
      return;
    }
    const context = this.maskOf(this.current).getContext("2d");
    Object.assign(context, {
      globalCompositeOperation: this.erasing ? "destination-out" : "source-over",
      strokeStyle: "white", lineWidth: Number(this.brushSize.value), lineCap: "round", lineJoin: "round",
    });
    context.beginPath();
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
    this.draw();
  }

  listen() {
    const canvas = this.canvas;
    canvas.addEventListener("pointerdown", (event) => {
      canvas.setPointerCapture(event.pointerId);
      this.lastPoint = this.pointAt(event);
      this.paint(this.lastPoint, this.lastPoint);
    });
    canvas.addEventListener("pointermove", (event) => {
      if (this.lastPoint) {
        const point = this.pointAt(event);
        this.paint(this.lastPoint, point);
        this.lastPoint = point;
      }
    });
    for (const type of ["pointerup", "pointercancel"]) {
      canvas.addEventListener(type, () => { this.lastPoint = null; });
    }
    canvas.addEventListener("keydown", (event) => this.onKey(event));
    canvas.addEventListener("focus", () => this.draw());
    canvas.addEventListener("blur", () => this.draw());
  }

  pointAt(event) {
    const box = this.canvas.getBoundingClientRect();
    return { x: (event.clientX - box.left) * (this.canvas.width / box.width),
             y: (event.clientY - box.top) * (this.canvas.height / box.height) };
  }

  onKey(event) {
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    if (event.key === " ") {
      this.penDown = !this.penDown;
      this.brushState.textContent = this.penDown ? "Brush down: the arrow keys paint." : "Brush lifted.";
      if (this.penDown) {
        this.paint(this.cursor, this.cursor);
      }
    } else if (moves[event.key]) {
      const step = KEY_STEP * (event.shiftKey ? 4 : 1);
      const [dx, dy] = moves[event.key];
      const to = { x: clamp(this.cursor.x + dx * step, 0, this.canvas.width),
                   y: clamp(this.cursor.y + dy * step, 0, this.canvas.height) };
      if (this.penDown) {
        this.paint(this.cursor, to);
      }
      this.cursor = to;
      this.draw();
    } else {
      return;
    }
    event.preventDefault(); // no scrolling
  }

  // --- what is shown ---

  draw() {
    const { context, canvas } = this;
    context.clearRect(0, 0, canvas.width, canvas.height);
    if (!this.photo) {
      return;
    }
    context.drawImage(this.photo, 0, 0, canvas.width, canvas.height);
    this.styles.forEach((style, index) => {
      if (this.masks.has(style.key)) {
        context.globalAlpha = style.key === this.current ? 0.6 : 0.35;
        context.drawImage(this.tinted(this.masks.get(style.key), colourOf(index)), 0, 0);
        context.globalAlpha = 1;
      }
    });
    if (document.activeElement === canvas) {
      context.lineWidth = 2;
      context.strokeStyle = "black";
      context.beginPath();
      context.arc(this.cursor.x, this.cursor.y, Number(this.brushSize.value) / 2, 0, 2 * Math.PI);
      context.stroke();
    }
  }

  tinted(mask, colour) {
    const tint = this.blank(null);
    const context = tint.getContext("2d");
    context.drawImage(mask, 0, 0);
    context.globalCompositeOperation = "source-in";
    context.fillStyle = colour;
    context.fillRect(0, 0, tint.width, tint.height);
    return tint;
  }

  showChoices() {
    const ready = this.photo && this.styles.length;
    this.emptyNote.hidden = Boolean(ready);
    const choices = ready ? this.styles.map((style, index) => {
      const radio = element("input", { type: "radio", name: "mask-style", value: style.key,
                                       checked: style.key === this.current });
      radio.addEventListener("change", () => {
        this.current = style.key;
        this.draw();
      });
      const label = element("label");
      const swatch = element("span", { className: "swatch" });
      swatch.style.background = colourOf(index);
      label.append(radio, " ", swatch, `${style.label} (mask_${index + 1})`);
      return label;
    }) : [];
    this.styleChoices.querySelectorAll("label").forEach((label) => label.remove());
    this.styleChoices.append(...choices);
  }
}

function colourOf(index) {
  return COLOURS[index % COLOURS.length];
}

function clamp(value, low, high) {
  return Math.min(high, Math.max(low, value));
}
