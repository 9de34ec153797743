// The Requests page (being built).

import { el, main } from "./ui.js";

export default function requestsPage() {
  main.replaceChildren(el("h2", {}, "Requests"));
  return () => {};
}
