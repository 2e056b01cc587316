/** A new element with the given properties. */
export function element(tag, properties = {}) {
  return Object.assign(document.createElement(tag), properties);
}
