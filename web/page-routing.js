// The Routing page (being built).

import { el, main } from "./ui.js";

export default function routingPage() {
  main.replaceChildren(el("h2", {}, "Routing"));
  return () => {};
}
