"""The review page: one HTML file with the data inline, the charts as inline SVG and thumbnails beside it.

Everything that comes from the dataset (file names, captions, tags, reasons) is HTML-escaped where Python writes
it, and set with ``textContent`` where the script does; the data block is JSON with ``<``, ``>`` and ``&``
written as ``\\u003c``..., so no caption can end the block. Nothing is fetched: it opens from disk.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from pathlib import Path
from typing import Any, Sequence

from sdtune import __version__
from sdtune.review.assets import CSS, JS
from sdtune.review.collect import THUMB_DIR, Item, Review, token_histogram

FLAG_FILTERS = ("no caption", "empty caption", "duplicate", "over token limit", "cache not valid", "upscaled",
                "skipped")


def esc(value: Any) -> str:
    """``value`` as text escaped for HTML, quotes included."""
    return html.escape(str(value), quote=True)


def json_for_script(data: Any) -> str:
    """JSON safe inside ``<script type="application/json">``: no ``</script>``, no ``<!--``."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _reso(r: Sequence[int] | None) -> str | None:
    return f"{r[0]}x{r[1]}" if r else None


def item_json(item: Item, tag_index: dict[str, int], max_token_length: int) -> dict[str, Any]:
    """An item as the page's script reads it (crop as fractions of the resized image, tags as indexes into
    ``tag_index``)."""
    crop = None
    if item.crop is not None and item.resized is not None:
        rw, rh = item.resized
        l, t, r, b = item.crop
        crop = [round(l / rw, 6), round(t / rh, 6), round(r / rw, 6), round(b / rh, 6)]
    return {
        "key": item.key, "name": item.name, "trained": item.trained, "skip": item.skip,
        "size": list(item.size) if item.size else None, "bucket": _reso(item.bucket),
        "resized": list(item.resized) if item.resized else None, "crop": crop, "crop_px": list(item.crop or []),
        "crop_from": item.crop_from, "upscaled": item.upscaled, "latent": item.latent if item.size else "",
        "latent_note": item.latent_note, "flipped": item.flipped, "caption": item.caption,
        "caption_state": item.caption_state, "tags": sorted({tag_index[t] for t in item.tags}),
        "tokens": item.tokens, "cuts": item.cuts, "parts": item.parts, "fixed_parts": item.fixed_parts,
        "fixed_tokens": item.fixed_tokens, "duplicates": item.duplicates,
        "thumb": f"{THUMB_DIR}/{item.thumb}" if item.thumb else None, "error": item.error,
        "flags": item.flags(max_token_length),
    }


# ------------------------------------------------------------------------------------------------ charts
def hbar_chart(chart_id: str, title: str, rows: Sequence[tuple[str, float, str]], label_width: int = 110,
               width: int = 560, row_height: int = 18) -> str:
    """Horizontal bars: (label, value, text after the bar) per row."""
    if not rows:
        return f'<p class="note">{esc(title)}: nothing to show.</p>'
    top = max(v for _l, v, _t in rows) or 1
    bar_room = width - label_width - 170
    height = row_height * len(rows) + 8
    out = [f'<svg id="{chart_id}" viewBox="0 0 {width} {height}" role="img" aria-labelledby="{chart_id}-t">',
           f'<title id="{chart_id}-t">{esc(title)}</title>']
    for i, (label, value, text) in enumerate(rows):
        y = 4 + i * row_height
        length = max(1.0, bar_room * value / top)
        out.append(f'<text x="{label_width - 6}" y="{y + 13}" text-anchor="end">{esc(label)}</text>'
                   f'<rect class="bar" x="{label_width}" y="{y + 2}" width="{length:.1f}" height="{row_height - 5}">'
                   f'<title>{esc(label)}: {esc(text)}</title></rect>'
                   f'<text x="{label_width + length + 5:.1f}" y="{y + 13}">{esc(text)}</text>')
    out.append("</svg>")
    return "".join(out)


def token_chart(values: list[int], max_token_length: int, width: int = 560, height: int = 190) -> str:
    """The SVG histogram of the captions' token counts, with the 75/150/225 limits marked (``max_token_length``'s
    highlighted)."""
    bins = token_histogram(values)
    if not bins:
        return '<p class="note">Token counts: unavailable.</p>'
    bin_width, top_value = 5, max(n for _s, n in bins) or 1
    span = max(bins[-1][0] + bin_width, 240)
    left, bottom, plot_h = 40, height - 28, height - 48
    scale_x = (width - left - 10) / span
    out = [f'<svg id="chart-tokens" viewBox="0 0 {width} {height}" role="img" aria-labelledby="chart-tokens-t">',
           f'<title id="chart-tokens-t">Token counts of the captions ({len(values)} captions, bins of {bin_width} '
           f'tokens); training keeps {max_token_length}</title>',
           f'<line class="axis" x1="{left}" y1="{bottom}" x2="{width - 10}" y2="{bottom}"/>',
           f'<text x="{left - 4}" y="{bottom - plot_h + 4}" text-anchor="end">{top_value}</text>',
           f'<text x="{left - 4}" y="{bottom}" text-anchor="end">0</text>']
    for start, n in bins:
        if n:
            h = plot_h * n / top_value
            out.append(f'<rect class="bar" x="{left + start * scale_x:.1f}" y="{bottom - h:.1f}" '
                       f'width="{max(1.0, bin_width * scale_x - 1):.1f}" height="{h:.1f}">'
                       f'<title>{start}-{start + bin_width - 1} tokens: {n} captions</title></rect>')
    for limit in (75, 150, 225):
        x = left + limit * scale_x
        cls = "limit active" if limit == max_token_length else "limit"
        out.append(f'<line class="{cls}" x1="{x:.1f}" y1="{bottom - plot_h - 6}" x2="{x:.1f}" y2="{bottom}"/>'
                   f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle">{limit}</text>')
    out.append(f'<text x="{width - 10}" y="{height - 2}" text-anchor="end">tokens</text></svg>')
    return "".join(out)


# ------------------------------------------------------------------------------------------------ page
def _summary_html(review: Review) -> str:
    s = review.summary()
    limit = review.options.max_token_length
    err = s["mean_aspect_error"]
    figures = [
        ("images trained", s["images"], "sum-images", False),
        ("buckets", s["buckets"], "sum-buckets", False),
        (f"steps per epoch at batch {review.options.train_batch_size}", s["steps_per_epoch"], "sum-steps", False),
        ("mean aspect error", f"{err:.4f}" if err is not None else "n/a", "sum-aspect", False),
        (f"captions over {limit} tokens", s["over_limit"] if review.tokenizer_ok else "n/a", "sum-over",
         bool(s["over_limit"])),
        ("skipped", s["skipped"], "sum-skipped", bool(s["skipped"])),
        ("no caption", s["no_caption"], "sum-nocaption", bool(s["no_caption"])),
        ("empty caption", s["empty_caption"], "sum-empty", bool(s["empty_caption"])),
        ("duplicate images", s["duplicates"], "sum-duplicates", bool(s["duplicates"])),
        ("upscaled", s["upscaled"], "sum-upscaled", False),
        ("latent cache not valid", s["cache_problems"], "sum-cache", bool(s["cache_problems"])),
    ]
    cells = "".join(f'<div class="{"bad" if bad else ""}"><dt>{esc(name)}</dt><dd id="{ident}">{esc(value)}</dd></div>'
                    for name, value, ident, bad in figures)
    return f'<dl class="summary">{cells}</dl>'


def _bucket_section(review: Review) -> str:
    rows = review.bucket_rows()
    bs = review.options.train_batch_size
    chart_rows = []
    table = ['<table id="bucket-table"><caption class="visually-hidden">Images and batches per bucket</caption>'
             '<thead><tr><th scope="col">bucket</th><th scope="col" class="num">aspect</th>'
             '<th scope="col" class="num">images</th><th scope="col" class="num">batches</th>'
             f'<th scope="col" class="num">full ({bs})</th><th scope="col">smaller batches</th></tr></thead><tbody>']
    for row in rows:
        w, h = row["bucket"]
        partial = ", ".join(str(p) for p in row["partial"]) or "none"
        text = f'{row["images"]} img, {row["batches"]} batches' + (f' (last {partial})' if row["partial"] else "")
        chart_rows.append((f"{w}x{h}", row["images"], text))
        table.append(f'<tr><th scope="row">{w}x{h}</th><td class="num">{w / h:.3f}</td><td class="num">'
                     f'{row["images"]}</td><td class="num">{row["batches"]}</td><td class="num">{row["full"]}</td>'
                     f'<td>{esc(partial)}</td></tr>')
    table.append("</tbody></table>")
    chart = hbar_chart("chart-buckets", f"Images per bucket, and batches at --train_batch_size {bs} "
                       f"(with --dataset_repeats {review.options.dataset_repeats})", chart_rows[:80])
    more = f'<p class="note">The chart shows the first 80 of {len(rows)} buckets.</p>' if len(rows) > 80 else ""
    return chart, "".join(table) + more


def _tag_section(tag_counts: list[tuple[str, int]], tag_index: dict[str, int]) -> tuple[str, str]:
    chart = hbar_chart("chart-tags", f"The {min(25, len(tag_counts))} most frequent tags (images with each)",
                       [(t if len(t) <= 18 else t[:17] + "\u2026", n, str(n)) for t, n in tag_counts[:25]],
                       label_width=140)
    rows = "".join(f'<tr><td><button type="button" class="tag" data-tag="{tag_index[t]}" aria-pressed="false">'
                   f'{esc(t)}</button></td><td class="num">{n}</td></tr>' for t, n in tag_counts)
    table = ('<div class="scroll"><table id="tag-table"><caption class="visually-hidden">Tag frequency; a tag '
             'button shows only the images with that tag</caption><thead><tr><th scope="col">tag (click to filter)'
             f'</th><th scope="col" class="num">images</th></tr></thead><tbody>{rows}</tbody></table></div>')
    if not tag_counts:
        table = '<p class="note">No tags in the metadata.</p>'
    return chart, table


def _skipped_section(review: Review) -> str:
    rows = [(i.name, i.skip) for i in review.items if i.skip]
    if not rows:
        return '<p class="note" id="skipped-none">Nothing is skipped: every image is trained.</p>'
    body = "".join(f"<tr><td>{esc(n)}</td><td>{esc(r)}</td></tr>" for n, r in rows)
    return ('<div class="scroll"><table id="skipped-table"><thead><tr><th scope="col">file or entry</th>'
            f'<th scope="col">why training skips it</th></tr></thead><tbody>{body}</tbody></table></div>')


def render(review: Review) -> str:
    """The whole review page: one self-contained HTML file (styles, script and data inline, images by path)."""
    o = review.options
    tag_counts = review.tag_counts()
    tag_index = {t: i for i, (t, _n) in enumerate(tag_counts)}
    data = {
        "version": __version__, "max_token_length": o.max_token_length, "page_size": o.page_size, "thumb_size": o.thumb_size,
        "shuffle": o.shuffle_caption, "tags": [t for t, _n in tag_counts],
        "items": [item_json(i, tag_index, o.max_token_length) for i in review.items],
    }
    bucket_chart, bucket_table = _bucket_section(review)
    tag_chart, tag_table = _tag_section(tag_counts, tag_index)
    tokens = token_chart([i.tokens for i in review.trained if i.tokens is not None], o.max_token_length)
    return f"""<!DOCTYPE html>
<html lang="en">
{_head_html(review)}
<body>
{_header_html(review)}
<main>
<section aria-labelledby="h-summary"><h2 id="h-summary">Summary</h2>{_summary_html(review)}</section>
<section aria-labelledby="h-charts"><h2 id="h-charts">Charts</h2>
<div class="charts"><div class="chart">{bucket_chart}</div><div class="chart">{tokens}</div>
<div class="chart">{tag_chart}</div></div></section>
<section aria-labelledby="h-tables"><h2 id="h-tables">Buckets and tags</h2>
<div class="cols"><div><h3>Buckets</h3>{bucket_table}</div><div><h3>Tags</h3>{tag_table}</div></div></section>
<section aria-labelledby="h-skipped"><h2 id="h-skipped">Skipped</h2>{_skipped_section(review)}</section>
{_images_section(review)}
</main>
<script id="review-data" type="application/json">{json_for_script(data)}</script>
<script>{JS}</script>
</body>
</html>
"""


def _head_html(review: Review) -> str:
    """The <head>: a Content-Security-Policy that allows only the page's own inline style and script."""
    csp = (f"default-src 'none'; script-src {_csp_hash(JS)}; style-src {_csp_hash(CSS)}; "
           "img-src 'self' file: data:; base-uri 'none'; form-action 'none'")
    return f"""<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<title>sdtune review: {esc(Path(review.options.in_json).name)}</title>
<link rel="icon" href="data:,">
<style>{CSS}</style>
</head>"""


def _header_html(review: Review) -> str:
    """The page's heading: what was reviewed, with which training settings and tokenizer, and any problems."""
    o = review.options
    problems = "".join(f'<p class="state-bad">{esc(p)}</p>' for p in review.problems)
    settings = (f"--max_token_length {o.max_token_length}, --train_batch_size {o.train_batch_size}, "
                f"--dataset_repeats {o.dataset_repeats}"
                + (", --shuffle_caption" if o.shuffle_caption else "")
                + (f", --keep_tokens {o.keep_tokens}" if o.keep_tokens else ""))
    source = f"{o.in_json}" + (f" and {o.train_data_dir}" if o.train_data_dir else "")
    return f"""<header>
<h1>Dataset review</h1>
<p class="muted">{esc(source)}, as training sees it with {esc(settings)}. Tokens counted with
{esc(review.tokenizer_note)}. Written by sdtune {esc(__version__)}.</p>
{problems}
</header>"""


def _images_section(review: Review) -> str:
    """The image grid's section: its search, flag and bucket filters and pager; the script fills the grid."""
    bucket_options = "".join(f'<option value="{w}x{h}">{w}x{h}</option>' for (w, h) in
                             sorted({i.bucket for i in review.items if i.bucket}))
    flag_options = "".join(f'<option value="{esc(f)}">{esc(f)}</option>' for f in FLAG_FILTERS)
    return f"""<section id="images" aria-labelledby="h-images"><h2 id="h-images">Images</h2>
<p class="note">The outline is the part of each image training sees (the crop of the resized image); red struck-out
caption text is past the --max_token_length cut-off.</p>
<div class="controls" role="search">
<label>Search <input id="search" type="search" placeholder="file name or caption"></label>
<label>Flag <select id="flag"><option value="">any</option>{flag_options}</select></label>
<label>Bucket <select id="bucket"><option value="">any</option>{bucket_options}</select></label>
<button type="button" id="clear-tag" hidden>Clear tag filter</button>
<span class="pager"><button type="button" id="prev">Previous</button><span id="page-label"></span>
<button type="button" id="next">Next</button></span>
<span id="status" role="status" aria-live="polite"></span>
</div>
<ul id="grid" class="grid"></ul>
<noscript><p>The image grid needs JavaScript; the summary and tables above do not.</p></noscript>
</section>"""
