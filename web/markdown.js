// Model answers as DOM nodes: a small Markdown subset and the split of reasoning from the
// answer. Only createElement/textContent: text from a model never becomes HTML.

// ---- Markdown for model answers, built with DOM nodes only (never innerHTML): paragraphs,
// headings, fenced code blocks, bullet and numbered lists, inline `code`, **bold**, *italic*.
function inline(text) {
  const out = [];
  const re = /`([^`\n]+)`|\*\*([^*\n]+)\*\*|(?<![\w*])\*([^*\n]+)\*(?![\w*])/g;
  let last = 0;
  let m;
  while ((m = re.exec(text)) !== null) {
    if (m.index > last) out.push(document.createTextNode(text.slice(last, m.index)));
    const [tag, inner] = m[1] !== undefined ? ["code", m[1]]
      : m[2] !== undefined ? ["strong", m[2]] : ["em", m[3]];
    const node = document.createElement(tag);
    node.textContent = inner;
    out.push(node);
    last = re.lastIndex;
  }
  if (last < text.length) out.push(document.createTextNode(text.slice(last)));
  return out;
}

export function renderMarkdown(text) {
  const frag = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n/g, "\n").split("\n");
  let para = [];
  let list = null;
  const flushPara = () => {
    if (!para.length) return;
    const p = document.createElement("p");
    para.forEach((line, i) => {
      if (i) p.append(document.createElement("br"));
      p.append(...inline(line));
    });
    frag.append(p);
    para = [];
  };
  const endList = () => { list = null; };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*(```+|~~~+)\s*([\w+-]*)/);
    if (fence) {
      flushPara(); endList();
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      if (fence[2]) code.dataset.lang = fence[2];
      code.textContent = body.join("\n");
      pre.append(code);
      frag.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    if (heading) {
      flushPara(); endList();
      const h = document.createElement(`h${Math.min(6, heading[1].length + 2)}`);
      h.append(...inline(heading[2]));
      frag.append(h);
    } else if (bullet || numbered) {
      flushPara();
      const tag = bullet ? "ul" : "ol";
      if (!list || list.tagName.toLowerCase() !== tag) {
        list = document.createElement(tag);
        frag.append(list);
      }
      const li = document.createElement("li");
      li.append(...inline((bullet || numbered)[1]));
      list.append(li);
    } else if (!line.trim()) {
      flushPara(); endList();
    } else {
      endList();
      para.push(line);
    }
  }
  flushPara();
  return frag;
}

// Reasoning arrives as `delta.reasoning_content`, or as <think>...</think> in the text.
export function splitThinking(reasoning, content) {
  let thinking = reasoning;
  let answer = "";
  let rest = content;
  for (;;) {
    const open = rest.indexOf("<think>");
    if (open < 0) { answer += rest; break; }
    answer += rest.slice(0, open);
    const close = rest.indexOf("</think>", open);
    if (close < 0) { thinking += rest.slice(open + 7); break; }
    thinking += rest.slice(open + 7, close);
    rest = rest.slice(close + 8);
  }
  return { thinking: thinking.trim(), answer: answer.replace(/^\s+/, "") };
}
