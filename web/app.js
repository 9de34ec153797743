// The macmesh web UI's entry point: routes between pages (one module each). Pages render
// with DOM APIs only: every name and model output goes in as text, never as HTML.

import { renderMarkdown } from "./markdown.js";
import chatPage from "./page-chat.js";
import meshPage from "./page-mesh.js";
import modelsPage from "./page-models.js";
import requestsPage from "./page-requests.js";
import routingPage from "./page-routing.js";
import voicePage from "./page-voice.js";
import { onKeyEntered, setConn } from "./ui.js";

// Re-exported for tests that render in the page.
export { renderMarkdown };

// ---- Routing between pages (history API; the server serves index.html for /ui/*).
const PAGES = {
  mesh: meshPage,
  models: modelsPage,
  chat: chatPage,
  voice: voicePage,
  routing: routingPage,
  requests: requestsPage,
};
let leave = () => {};

function route() {
  const name = location.pathname.replace(/^\/(ui\/?)?/, "").split("/")[0] || "mesh";
  const page = PAGES[name] ? name : "mesh";
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.page === page);
  }
  leave();
  setConn("", false);
  leave = PAGES[page]();
}

document.querySelector("nav").addEventListener("click", (ev) => {
  const a = ev.target.closest("a[data-page]");
  if (!a || ev.metaKey || ev.ctrlKey || ev.shiftKey) return;
  ev.preventDefault();
  history.pushState(null, "", a.getAttribute("href"));
  route();
});
window.addEventListener("popstate", route);
onKeyEntered(route);
route();
