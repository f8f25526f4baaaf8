"""The review page's stylesheet and script, inlined into the page (it must open from disk, with no network).

The script builds the image cards from the JSON data block with ``textContent`` and DOM calls only (never
``innerHTML``), so a caption or file name holding markup is shown as text. The page's Content-Security-Policy
allows exactly this script and stylesheet (by hash): nothing else can run even if some text escaped escaping.
"""

CSS = r"""
:root { --fg: #1b1b1b; --muted: #5a5a5a; --bg: #fafafa; --card: #fff; --line: #d0d0d0; --accent: #0b5cad;
        --warn: #a04000; --bad: #b00020; --ok: #1d6b2f; --crop: #ff2d7a; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; padding: 1rem 1.5rem 3rem; max-width: 1600px; }
h1 { font-size: 1.5rem; margin: .2rem 0 .3rem; } h2 { font-size: 1.2rem; margin: 1.6rem 0 .5rem; }
.muted, .note { color: var(--muted); }
.summary { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: .5rem; margin: 0; }
.summary div { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: .4rem .7rem; }
.summary dt { font-size: .8rem; color: var(--muted); } .summary dd { margin: 0; font-size: 1.35rem; font-weight: 600; }
.summary .bad dd { color: var(--bad); }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(380px, 1fr)); gap: 1rem; }
.chart { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: .5rem; }
.chart svg { width: 100%; height: auto; display: block; }
svg text { font: 11px system-ui, sans-serif; fill: var(--fg); }
svg .bar { fill: #4c7fbf; } svg .bar2 { fill: #9fbbe0; } svg .limit { stroke: var(--warn); stroke-dasharray: 4 3; }
svg .limit.active { stroke: var(--bad); stroke-dasharray: none; stroke-width: 2; } svg .axis { stroke: #888; }
table { border-collapse: collapse; background: var(--card); }
th, td { border: 1px solid var(--line); padding: .2rem .5rem; text-align: left; vertical-align: top; }
th { background: #eef1f5; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { max-height: 24rem; overflow: auto; display: inline-block; border: 1px solid var(--line); }
.cols { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
button.tag { font: inherit; background: none; border: 0; padding: 0; color: var(--accent); text-decoration: underline;
             cursor: pointer; text-align: left; }
button.tag[aria-pressed="true"] { font-weight: 700; }
.controls { display: flex; flex-wrap: wrap; gap: .6rem 1rem; align-items: center; margin: .5rem 0;
            position: sticky; top: 0; background: var(--bg); padding: .4rem 0; z-index: 2;
            border-bottom: 1px solid var(--line); }
.controls label { display: inline-flex; gap: .3rem; align-items: center; }
.grid { list-style: none; padding: 0; margin: .5rem 0; display: grid; gap: .8rem;
        grid-template-columns: repeat(auto-fill, minmax(270px, 1fr)); }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: .5rem; }
.card.skipped { opacity: .75; border-style: dashed; }
.card figure { margin: 0; }
.thumb { position: relative; margin: 0 auto; max-width: 100%; background: #ddd; }
.thumb img { display: block; width: 100%; height: 100%; }
.thumb .crop { position: absolute; border: 2px solid var(--crop); box-shadow: 0 0 0 9999px rgba(0,0,0,.35);
               pointer-events: none; }
.thumb { overflow: hidden; }
.nothumb { padding: 1rem; text-align: center; color: var(--muted); background: #eee; }
.card h3 { font-size: .9rem; margin: .4rem 0 .2rem; word-break: break-all; }
.facts { display: grid; grid-template-columns: auto 1fr; gap: 0 .5rem; margin: 0; font-size: .82rem; }
.facts dt { color: var(--muted); } .facts dd { margin: 0; }
.state-valid { color: var(--ok); } .state-bad { color: var(--bad); } .state-warn { color: var(--warn); }
.flags { display: flex; flex-wrap: wrap; gap: .25rem; margin: .3rem 0; padding: 0; list-style: none; }
.flags li { font-size: .75rem; border-radius: 3px; padding: 0 .35rem; background: #fde7d9; color: #6b2600; }
.caption { font-size: .85rem; margin: .3rem 0; white-space: pre-wrap; word-break: break-word; }
.caption .cut-text { color: var(--bad); text-decoration: line-through; background: #fde2e4; }
.caption .chunk-mark, .caption .cut-mark { font-size: .7rem; font-weight: 700; border-radius: 3px; padding: 0 .2rem;
                                           margin: 0 .1rem; }
.caption .chunk-mark { background: #e6ecf5; color: #334; } .caption .cut-mark { background: var(--bad); color: #fff; }
.tokens { font-size: .8rem; } .tokens.over { color: var(--bad); font-weight: 600; }
.parts { font-size: .78rem; margin: .2rem 0; } .parts .fixed { background: #dff3e4; border-radius: 3px; padding: 0 .2rem; }
.pager { display: flex; gap: .5rem; align-items: center; }
.visually-hidden { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
"""

JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("review-data").textContent);
  var items = data.items, tags = data.tags, limit = data.max_token_length;
  var state = { page: 0, tag: -1, flag: "", bucket: "", text: "" };
  var grid = document.getElementById("grid"), status = document.getElementById("status");
  var pageLabel = document.getElementById("page-label");

  function el(name, cls, text) {
    var e = document.createElement(name);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function matches(it) {
    if (state.tag >= 0 && it.tags.indexOf(state.tag) < 0) { return false; }
    if (state.flag && it.flags.indexOf(state.flag) < 0) { return false; }
    if (state.bucket && it.bucket !== state.bucket) { return false; }
    if (state.text) {
      var t = state.text;
      if (it.name.toLowerCase().indexOf(t) < 0 && it.caption.toLowerCase().indexOf(t) < 0) { return false; }
    }
    return true;
  }
  function captionNode(it) {
    var p = el("p", "caption");
    if (!it.caption) { p.appendChild(el("span", "muted", it.caption_state === "none" ? "(no caption)" : "(empty caption)")); return p; }
    var pos = 0, cuts = it.cuts || [];
    for (var i = 0; i < cuts.length; i++) {
      var c = cuts[i], lim = c[0], off = c[1], inside = c[2];
      if (lim > limit) { break; }
      p.appendChild(document.createTextNode(it.caption.slice(pos, off)));
      pos = off;
      var word = inside ? " (inside the next word)" : "";
      if (lim === limit) {
        var m = el("mark", "cut-mark", "\u2702 " + lim);
        m.title = "cut-off: training keeps " + lim + " tokens" + word;
        p.appendChild(m);
        var rest = el("del", "cut-text", it.caption.slice(off));
        rest.title = "not seen by the text encoder (past " + lim + " tokens)";
        p.appendChild(rest);
        return p;
      }
      var k = el("span", "chunk-mark", "|" + lim);
      k.title = "end of the first " + lim + " tokens (a " + lim + "-token chunk boundary)" + word;
      p.appendChild(k);
    }
    p.appendChild(document.createTextNode(it.caption.slice(pos)));
    return p;
  }
  function fact(dl, name, value, cls) {
    dl.appendChild(el("dt", null, name));
    dl.appendChild(el("dd", cls || null, value));
  }
  function card(it) {
    var li = el("li", "card" + (it.skip ? " skipped" : ""));
    li.dataset.key = it.key; li.dataset.name = it.name;
    var fig = el("figure");
    if (it.thumb && it.size) {
      var box = el("div", "thumb");
      var w = it.size[0], h = it.size[1], scale = Math.min(240 / w, 240 / h);  // small images shown larger
      box.style.aspectRatio = w + " / " + h;
      box.style.width = Math.round(w * scale) + "px";
      var img = el("img");
      img.src = it.thumb; img.loading = "lazy"; img.decoding = "async";
      img.width = Math.round(w * scale); img.height = Math.round(h * scale);
      img.alt = it.name + ", " + w + "\u00d7" + h + (it.bucket ? ", trained as bucket " + it.bucket : "") +
        (it.crop && it.resized ? ", crop outlined: x " + it.crop_px[0] + "-" + it.crop_px[2] + ", y " + it.crop_px[1] +
         "-" + it.crop_px[3] + " of the image resized to " + it.resized[0] + "\u00d7" + it.resized[1] : "");
      box.appendChild(img);
      if (it.crop) {
        var r = el("div", "crop");
        r.setAttribute("aria-hidden", "true");
        r.style.left = (100 * it.crop[0]) + "%"; r.style.top = (100 * it.crop[1]) + "%";
        r.style.width = (100 * (it.crop[2] - it.crop[0])) + "%"; r.style.height = (100 * (it.crop[3] - it.crop[1])) + "%";
        box.appendChild(r);
      }
      fig.appendChild(box);
    } else {
      fig.appendChild(el("div", "nothumb", it.error ? "no picture: " + it.error : "no image file"));
    }
    var cap = el("figcaption");
    cap.appendChild(el("h3", null, it.name));
    var flags = el("ul", "flags");
    it.flags.forEach(function (f) { flags.appendChild(el("li", null, f)); });
    if (it.flags.length) { cap.appendChild(flags); }
    var dl = el("dl", "facts");
    if (it.skip) { fact(dl, "skipped", it.skip, "state-bad"); }
    fact(dl, "bucket", it.bucket || "none");
    if (it.size) { fact(dl, "image", it.size[0] + "\u00d7" + it.size[1]); }
    if (it.resized) { fact(dl, "resized", it.resized[0] + "\u00d7" + it.resized[1] + (it.upscaled ? " (upscaled)" : " (not upscaled)"), it.upscaled ? "state-warn" : null); }
    if (it.crop_from) { fact(dl, "crop from", it.crop_from); }
    if (it.latent) {
      var cls = it.latent === "valid" ? "state-valid" : (it.latent === "missing" ? "state-warn" : "state-bad");
      var d = it.latent + (it.flipped === true ? ", flipped copy too" : (it.flipped === false ? ", no flipped copy" : ""));
      fact(dl, "latents", d, cls);
      dl.lastChild.title = it.latent_note;
    }
    if (it.error && it.thumb) { fact(dl, "note", it.error, "state-bad"); }
    if (it.duplicates.length) { fact(dl, "same bytes as", it.duplicates.join(", "), "state-warn"); }
    cap.appendChild(dl);
    if (it.tokens !== null) {
      var over = it.tokens > limit;
      cap.appendChild(el("div", "tokens" + (over ? " over" : ""), it.tokens + " tokens of " + limit + (over ? ": " + (it.tokens - limit) + " cut off" : "")));
    }
    cap.appendChild(captionNode(it));
    if (it.parts && it.parts.length) {
      var parts = el("p", "parts");
      parts.appendChild(el("span", "muted", data.shuffle ? "shuffled each use, " : ""));
      for (var i = 0; i < it.parts.length; i++) {
        if (i) { parts.appendChild(document.createTextNode(", ")); }
        parts.appendChild(el("span", i < it.fixed_parts ? "fixed" : null, it.parts[i]));
      }
      if (it.fixed_parts) {
        parts.appendChild(el("span", "muted", " (first " + it.fixed_parts + " fixed" + (it.fixed_tokens !== null ? ", " + it.fixed_tokens + " tokens" : "") + ")"));
      }
      cap.appendChild(parts);
    }
    fig.appendChild(cap);
    li.appendChild(fig);
    return li;
  }
  function render() {
    var shown = items.filter(matches), per = data.page_size;
    var pages = Math.max(1, Math.ceil(shown.length / per));
    if (state.page >= pages) { state.page = pages - 1; }
    var frag = document.createDocumentFragment();
    shown.slice(state.page * per, (state.page + 1) * per).forEach(function (it) { frag.appendChild(card(it)); });
    grid.replaceChildren(frag);
    var what = [];
    if (state.tag >= 0) { what.push("tag \u201c" + tags[state.tag] + "\u201d"); }
    if (state.flag) { what.push("flag \u201c" + state.flag + "\u201d"); }
    if (state.bucket) { what.push("bucket " + state.bucket); }
    if (state.text) { what.push("text \u201c" + state.text + "\u201d"); }
    status.textContent = shown.length + " of " + items.length + " images" + (what.length ? " with " + what.join(", ") : "");
    status.dataset.count = String(shown.length);
    pageLabel.textContent = "page " + (state.page + 1) + " of " + pages;
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = state.page >= pages - 1;
    document.getElementById("clear-tag").hidden = state.tag < 0;
    document.querySelectorAll("button.tag").forEach(function (b) {
      b.setAttribute("aria-pressed", String(Number(b.dataset.tag) === state.tag));
    });
  }
  document.querySelectorAll("button.tag").forEach(function (b) {
    b.addEventListener("click", function () {
      var t = Number(b.dataset.tag);
      state.tag = state.tag === t ? -1 : t; state.page = 0; render();
      document.getElementById("images").scrollIntoView();
    });
  });
  document.getElementById("clear-tag").addEventListener("click", function () { state.tag = -1; state.page = 0; render(); });
  document.getElementById("flag").addEventListener("change", function (e) { state.flag = e.target.value; state.page = 0; render(); });
  document.getElementById("bucket").addEventListener("change", function (e) { state.bucket = e.target.value; state.page = 0; render(); });
  var timer = null;
  document.getElementById("search").addEventListener("input", function (e) {
    clearTimeout(timer);
    timer = setTimeout(function () { state.text = e.target.value.trim().toLowerCase(); state.page = 0; render(); }, 150);
  });
  document.getElementById("prev").addEventListener("click", function () { state.page -= 1; render(); });
  document.getElementById("next").addEventListener("click", function () { state.page += 1; render(); });
  render();
  document.body.dataset.readyMs = String(Math.round(performance.now()));  // read by bench/bench_review.py
  document.body.dataset.ready = "true";
})();
"""
