"""A self-contained HTML report of a run, and the overlay helpers it shares with the API and TensorBoard.

``python -m m2ib_lightning.report OUTPUT_DIR --data pairs.jsonl -o report.html`` writes ONE file:
images and overlays are inlined as base64 PNGs, tokens are highlighted with inline styles, paging,
filtering and sorting are a few lines of plain JavaScript, and nothing is fetched from the network,
so the file can be mailed, archived or opened offline. A report of more samples than ``per_file``
(large runs) is split: ``report.html`` becomes an index (means, evaluation, settings, skips, a
table of files) linking self-contained page files in ``report-pages/``. The data is read once: the
cards are rendered as its stream reaches their rows, kept in a temporary file, and the HTML files
are written one at a time, so memory stays bounded. ``select`` picks which samples enter the report
from the whole run (e.g. the least similar pairs first), before ``limit``. Per sample it shows the
image as the model saw it (resized and cropped by the checkpoint's image processor), the map over
it, the caption with one colour per token, the clean similarity, and metrics: the run's own
per-sample evaluation values (stored with the records when ``evaluation.enabled``), else the
pointing game and the energy inside the ground truth when the data has a ``bbox`` or ``mask``
column, plus any numbers given per id in a ``--metrics`` JSON-lines file.

Without ``--data`` the report still works from the output directory alone: it shows the writer's
overlay PNGs where they exist, else the map by itself, and the tokens instead of the caption.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from m2ib_lightning.data import load_image
from m2ib_lightning.outputs import OVERLAYS, AttributionRecord, load_attributions
from m2ib_lightning.outputs.overlays import colour_ramp, model_view, overlay

log = logging.getLogger(__name__)

__all__ = ["build_report", "ground_truth_metrics", "main", "token_html"]

# Sub-word markers of common tokenizers: CLIP BPE ends words with </w>, GPT-2 BPE and
# sentencepiece start them with these characters.
_WORD_END, _WORD_STARTS = "</w>", ("\u0120", "\u2581")


def _png(image: Image.Image | np.ndarray, side: int | None = None) -> str:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if side is not None and max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------- text
def _display(token: str) -> str:
    text = token
    if text.endswith(_WORD_END):
        text = text[: -len(_WORD_END)]
    for mark in _WORD_STARTS:
        text = text.replace(mark, " ")
    return text.strip() or token


def token_html(tokens: Sequence[str], scores: Sequence[float]) -> str:
    """Tokens as ``<span>`` s whose background opacity is the token's score in [0, 1] (inline styles)."""
    if len(tokens) != len(scores):
        raise ValueError(f"expected one score per token, got {len(tokens)} tokens and {len(scores)} scores")
    spans = []
    for i, (token, score) in enumerate(zip(tokens, scores)):
        s = float(np.clip(score, 0.0, 1.0))
        special = token.startswith("<") and token.endswith(">") and len(token) > 2 or (
            token.startswith("[") and token.endswith("]"))
        muted = "font-size:75%;color:#333;font-style:italic;" if special else ""
        style = f"background:rgba(230,80,20,{s:.3f});{muted}"
        spans.append(f'<span class="tok" style="{style}" title="{html.escape(token)}: {s:.3f}" '
                     f'data-i="{i}">{html.escape(_display(token))}</span>')
    return " ".join(spans)


# ---------------------------------------------------------------------------------- metrics
def ground_truth_metrics(image_map: np.ndarray, truth: np.ndarray, tolerance: float = 15.0) -> dict[str, float]:
    """Per-sample localisation metrics, with the evaluation callback's definitions
    (:mod:`m2ib_lightning.evaluation.metrics`).

    Args:
        image_map: ``(H, W)`` in [0, 1]; truth: ``(H, W)`` bool at the same size.
        tolerance: pointing-game tolerance in pixels of the map.

    Returns:
        ``pointing_game`` (1 if the map's maximum is within ``tolerance`` of the region),
        ``energy_pointing_game`` (fraction of the map's mass inside it) and ``mask_auroc`` (left out
        when the region is empty or everything).
    """
    import torch

    from m2ib_lightning.evaluation.metrics import energy_pointing_game, mask_auroc, pointing_game

    if truth.shape != image_map.shape:
        raise ValueError(f"ground truth {truth.shape} and map {image_map.shape} differ in size")
    maps, masks = torch.from_numpy(np.asarray(image_map, dtype=np.float32))[None], torch.from_numpy(truth)[None]
    out = {"pointing_game": float(pointing_game(maps, masks, tolerance)),
           "energy_pointing_game": float(energy_pointing_game(maps, masks))}
    auroc = float(mask_auroc(maps, masks))
    if auroc == auroc:  # NaN: undefined for this mask
        out["mask_auroc"] = auroc
    return out


def _truth(row: Mapping[str, Any], size: tuple[int, int], image: Image.Image | None) -> np.ndarray | None:
    value = row.get("mask") if row.get("mask") is not None else row.get("bbox")
    if value is None:
        return None
    from m2ib_lightning.evaluation.ground_truth import ground_truth

    image_size = (image.height, image.width) if image is not None else None
    return ground_truth(value, size, image_size).numpy()


def _read_metrics(path: Path) -> dict[str, dict[str, float]]:
    """``{"id": ..., name: number, ...}`` per line -> ``{id: {name: number}}``."""
    out: dict[str, dict[str, float]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        entry = json.loads(line)
        if "id" not in entry:
            raise ValueError(f"{path}:{number}: expected an object with an 'id' key, got keys {sorted(entry)}")
        out.setdefault(str(entry.pop("id")), {}).update(
            {k: float(v) for k, v in entry.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    return out


# ------------------------------------------------------------------------------------- data
def _data_rows(data: str, split: str, image_column: str) -> Iterator[dict[str, Any]]:
    """Rows of a local data file (jsonl/json, parquet, csv) or a dataset id, streamed, images undecoded."""
    import datasets

    path = Path(data).expanduser()
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.is_file():
        if path.suffix not in builders:
            raise ValueError(f"--data {data}: expected a .jsonl, .json, .parquet or .csv file")
        ds = datasets.load_dataset(builders[path.suffix], data_files=str(path), split=split, streaming=True)
    else:
        ds = datasets.load_dataset(data, split=split, streaming=True)
    features = getattr(ds, "features", None) or {}
    if isinstance(features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    yield from ds


def _image_processor(model: str | None, metadata: Mapping[str, Any]) -> Any:
    """The run's image processor: ``model`` or the run's backbone when it is a local directory."""
    source = model or metadata.get("backbone")
    if not source or not Path(str(source)).expanduser().is_dir():
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(Path(str(source)).expanduser()))
    except (OSError, ValueError) as err:
        log.warning("could not load the image processor of %s (%s): assuming CLIP's centre crop", source, err)
        return None


# ------------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f4f4f6;color:#222}
header{background:#1f2430;color:#eee;padding:14px 22px}header h1{margin:0 0 4px;font-size:20px}
header .sub{font-size:13px;color:#bbb}main{padding:14px 22px}
.bar{display:flex;gap:10px;align-items:center;flex-wrap:wrap;margin:8px 0 14px}
.bar input,.bar select,.bar button{font-size:14px;padding:4px 8px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:14px}
.card{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.15);padding:10px}
.imgs{display:flex;gap:6px}.imgs figure{margin:0;flex:1;text-align:center}
.imgs img{width:100%;image-rendering:auto;border-radius:4px}
figcaption{font-size:11px;color:#777}.sid{font-family:monospace;font-size:12px;color:#555;margin-top:6px}
.cap{margin:4px 0;font-size:14px}.tokens{line-height:1.9;font-size:14px;margin:4px 0}
.tok{padding:1px 3px;border-radius:3px}
table.m{border-collapse:collapse;font-size:12px;margin-top:4px}table.m td{padding:1px 8px 1px 0}
table.m td.v{font-family:monospace;text-align:right}
table.s{border-collapse:collapse;font-size:13px}table.s td{padding:2px 12px 2px 0}
.legend{display:inline-block;width:140px;height:10px;vertical-align:middle;border-radius:2px}
details{margin-top:18px}nav.files{margin:10px 0;font-size:14px}
"""

_JS = """
(function(){
  var grid=document.getElementById('grid'),all=Array.prototype.slice.call(grid.children),shown=all,page=0;
  var per=parseInt(grid.getAttribute('data-per-page'),10),info=document.getElementById('pageinfo');
  function pages(){return Math.max(1,Math.ceil(shown.length/per));}
  function render(){
    page=Math.min(Math.max(page,0),pages()-1);
    all.forEach(function(c){c.style.display='none';});
    shown.slice(page*per,(page+1)*per).forEach(function(c){c.style.display='';});
    info.textContent='page '+(page+1)+' of '+pages()+' \\u00b7 '+shown.length+' of '+all.length+' samples';
  }
  function apply(){
    var q=document.getElementById('filter').value.toLowerCase(),key=document.getElementById('sort').value;
    shown=all.filter(function(c){return c.getAttribute('data-search').indexOf(q)>=0;});
    if(key){var sign=key.charAt(0)==='-'?-1:1,name=key.replace(/^-/,'');
      shown.sort(function(a,b){
        var x=parseFloat(a.getAttribute('data-'+name)),y=parseFloat(b.getAttribute('data-'+name));
        if(isNaN(x))return 1;if(isNaN(y))return -1;return sign*(x-y);});}
    shown.forEach(function(c){grid.appendChild(c);});page=0;render();
  }
  document.getElementById('prev').onclick=function(){page--;render();};
  document.getElementById('next').onclick=function(){page++;render();};
  document.getElementById('filter').oninput=apply;document.getElementById('sort').onchange=apply;
  document.addEventListener('keydown',function(e){if(e.target.tagName==='INPUT')return;
    if(e.key==='ArrowRight'){page++;render();}if(e.key==='ArrowLeft'){page--;render();}});
  render();
})();
"""


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def _attr(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def _card(record: AttributionRecord, picture: str | None, overlay_png: str | None, caption: str | None,
          metrics: Mapping[str, float]) -> str:
    figures = []
    if picture:
        figures.append(f'<figure><img src="{picture}" alt="input"><figcaption>input (model view)</figcaption></figure>')
    if overlay_png:
        figures.append(f'<figure><img src="{overlay_png}" alt="map"><figcaption>image map</figcaption></figure>')
    tokens = ""
    if record.tokens is not None and record.text_scores is not None:
        tokens = f'<div class="tokens">{token_html(record.tokens, record.text_scores)}</div>'
    elif record.tokens is not None:
        tokens = f'<div class="tokens">{html.escape(" ".join(_display(t) for t in record.tokens))}</div>'
    rows = "".join(f'<tr><td>{html.escape(k)}</td><td class="v">{_fmt(v)}</td></tr>' for k, v in metrics.items())
    search = html.escape(f"{record.id} {caption or ' '.join(record.tokens or [])}".lower())
    data = "".join(f' data-{_attr(k)}="{v:.6g}"' for k, v in metrics.items())
    cap = f'<div class="cap">{html.escape(caption)}</div>' if caption else ""
    return (f'<div class="card" data-search="{search}"{data}><div class="imgs">{"".join(figures)}</div>'
            f'<div class="sid">{html.escape(record.id)}</div>{cap}{tokens}<table class="m">{rows}</table></div>')


def build_report(
    output_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    data: str | None = None,
    *,
    split: str = "train",
    id_column: str = "id",
    image_column: str = "image",
    text_column: str = "caption",
    metrics: str | os.PathLike | None = None,
    model: str | None = None,
    limit: int | None = 500,
    per_page: int = 24,
    per_file: int = 500,
    select: str = "store",
    image_size: int | None = 224,
    tolerance: float = 15.0,
    title: str | None = None,
) -> Path:
    """Write the HTML report of the run in ``output_dir``; returns its path.

    Args:
        output_dir: an attribution output directory (:func:`~m2ib_lightning.load_attributions`).
        out: the HTML file to write (default: ``<output_dir>/report.html``).
        data: the run's data (a ``.jsonl`` / ``.parquet`` / ``.csv`` file or a dataset id) for the
            original images, captions and ground truth (``bbox`` / ``mask`` columns).
        split, id_column, image_column, text_column: how to read ``data``, as the datamodule does.
        metrics: a JSON-lines file of per-sample numbers, ``{"id": ..., "name": value, ...}``.
        model: directory of the checkpoint's image processor (default: the run's backbone, when it is
            a local directory); without one, CLIP's centre crop is assumed.
        limit: most samples in the report (the first ones in ``select`` order; ``None``: all). Every
            sample adds its images, about 50-150 kB for photos.
        per_page: samples per page (JavaScript paging inside a file).
        per_file: samples per HTML file; more make ``out`` an index of page files (module doc).
        select: the order samples are taken in from the whole run: ``"store"`` (as written),
            ``"similarity"`` (lowest first) or ``"-similarity"`` (highest first), or a per-sample
            number of the run's evaluation or of the ``metrics`` file, e.g. ``"-image/deletion_auc"``;
            samples without it come last.
        image_size: longest side of the embedded images in pixels (``None``: the map's size).
        tolerance: pointing-game tolerance in pixels of the map (as the evaluation callback's).
        title: page title (default: the output directory's name).
    """
    for name, value in (("per_page", per_page), ("per_file", per_file)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    records = load_attributions(output_dir)
    directory = Path(output_dir)
    target = Path(out) if out is not None else directory / "report.html"
    # Per-sample numbers: the evaluation's, stored with the records when it ran, then the file's.
    extra = {i: v for i, v in records.column("metrics").items() if v}
    for sample_id, numbers in (_read_metrics(Path(metrics)) if metrics is not None else {}).items():
        extra.setdefault(sample_id, {}).update(numbers)
    ids = _selected(records, extra, select)[: limit if limit is not None else None]
    processor = _image_processor(model, records.metadata) if data is not None else None
    root = Path(data).expanduser().parent if data is not None and Path(data).expanduser().is_file() else None
    totals: dict[str, list[float]] = {}

    def card(sample_id: str, row: Mapping[str, Any] | None) -> str:
        return _sample_card(records, directory, sample_id, row, extra.get(sample_id, {}), totals,
                            image_column=image_column, text_column=text_column, root=root, processor=processor,
                            image_size=image_size, tolerance=tolerance)

    results_file = directory / "results.json"  # written by the evaluation callback, when it ran
    results = json.loads(results_file.read_text()) if results_file.is_file() else None
    title = title or directory.resolve().name
    target.parent.mkdir(parents=True, exist_ok=True)
    chunks = [ids[a : a + per_file] for a in range(0, len(ids), per_file)]
    pages_dir = target.with_name(f"{target.stem}-pages")
    for stale in sorted(pages_dir.glob("page-*.html")):  # of an earlier, longer report
        stale.unlink()
    # ONE pass over the data renders every card into a spool file, and each HTML file reads its cards
    # back in the report's order: the data may be far larger than memory, and a pass per page file
    # would read it many times over. The spool sits beside the report, not in a /tmp that may be RAM.
    with tempfile.TemporaryFile(dir=target.parent, prefix=f".{target.stem}-", suffix=".spool") as spool:
        rows = _find_rows(data, set(ids), split, id_column, image_column) if data is not None else iter(())
        spans = _spool_cards(spool, ids, rows, card)

        def cards(chunk: Sequence[str]) -> list[str]:
            texts = []
            for sample_id in chunk:
                offset, length = spans[sample_id]
                spool.seek(offset)
                texts.append(spool.read(length).decode("utf-8"))
            return texts

        if len(chunks) <= 1:
            page = _page(title, records, ids, cards(ids), totals, per_page, data, results, select=select)
            target.write_text(page, encoding="utf-8")
            return target
        pages_dir.mkdir(exist_ok=True)
        names = [f"page-{n:05d}.html" for n in range(1, len(chunks) + 1)]
        for n, chunk in enumerate(chunks):
            nav = _file_nav(f"../{target.name}", names, n)
            start = n * per_file
            page = _page(f"{title} - file {n + 1} of {len(chunks)}", records, ids, cards(chunk), totals, per_page,
                         data, select=select, nav=nav, index=False,
                         shown=f"samples {start + 1}-{start + len(chunk)} of the report's {len(ids)}")
            (pages_dir / names[n]).write_text(page, encoding="utf-8")
    listing = "".join(
        f'<tr><td><a href="{pages_dir.name}/{name}">file {n + 1}</a></td><td>{len(chunk)} samples</td>'
        f"<td><code>{html.escape(chunk[0])}</code> &hellip; <code>{html.escape(chunk[-1])}</code></td></tr>"
        for n, (name, chunk) in enumerate(zip(names, chunks)))
    files = f'<h2>Samples, {per_file} per file</h2><table class="s">{listing}</table>'
    target.write_text(_page(title, records, ids, [], totals, per_page, data, results, select=select,
                            files=files), encoding="utf-8")
    return target


def _spool_cards(spool: Any, ids: Sequence[str], rows: Iterator[tuple[str, Mapping[str, Any]]],
                 card: Callable[[str, Mapping[str, Any] | None], str]) -> dict[str, tuple[int, int]]:
    """Write ``card(id, row)`` UTF-8 into ``spool`` for each ``(id, row)`` of ``rows`` as it comes (one
    data row in memory at a time), then ``card(id, None)`` for the ids it did not yield; return each
    card's ``(offset, length)``."""
    spans: dict[str, tuple[int, int]] = {}

    def put(sample_id: str, row: Mapping[str, Any] | None) -> None:
        encoded = card(sample_id, row).encode("utf-8")
        spans[sample_id] = (spool.tell(), len(encoded))
        spool.write(encoded)

    for sample_id, row in rows:
        put(sample_id, row)
    for sample_id in ids:
        if sample_id not in spans:
            put(sample_id, None)
    return spans


def _selected(records: Any, extra: Mapping[str, Mapping[str, float]], select: str) -> list[str]:
    """All record ids in ``select`` order (see :func:`build_report`)."""
    if select == "store":
        return list(records)
    key = select.removeprefix("-")
    if key == "similarity":
        values = records.column("similarity")
    elif any(key in numbers for numbers in extra.values()):
        values = {i: numbers.get(key) for i, numbers in extra.items()}
    else:
        names = sorted({k for numbers in extra.values() for k in numbers})
        raise ValueError(f"select must be 'store', '[-]similarity' or '[-]NAME' for a per-sample number of "
                         f"the run's evaluation or the metrics file {names}, got {select!r}")
    sign = -1.0 if select.startswith("-") else 1.0

    def order(sample_id: str) -> tuple[bool, float]:
        value = values.get(sample_id)
        missing = value is None or not np.isfinite(value)
        return missing, 0.0 if missing else sign * float(value)

    return sorted(records, key=order)  # stable: ties keep the store's order


def _file_nav(index: str, names: Sequence[str], n: int) -> str:
    links = [f'<a href="{index}">index</a>']
    if n > 0:
        links.append(f'<a href="{names[n - 1]}">&larr; file {n}</a>')
    if n + 1 < len(names):
        links.append(f'<a href="{names[n + 1]}">file {n + 2} &rarr;</a>')
    return '<nav class="files">' + " &middot; ".join(links) + "</nav>"


def _sample_card(records: Any, directory: Path, sample_id: str, row: Mapping[str, Any] | None,
                 extra: Mapping[str, float], totals: dict[str, list[float]], *, image_column: str,
                 text_column: str, root: Path | None, processor: Any, image_size: int | None,
                 tolerance: float) -> str:
    """One sample's card; its numbers are added to ``totals``."""
    record = records[sample_id]
    caption = row.get(text_column) if row is not None else None
    image = None
    if row is not None:
        try:
            image = load_image(row.get(image_column), root)
        except ValueError as err:
            log.warning("report: image of %s not shown: %s", sample_id, err)
    values = {"similarity": record.similarity}
    picture = overlay_png = None
    if record.image_map is not None:
        size = record.image_map.shape
        if image is not None:
            view = model_view(image, size, processor)
            picture = _png(view, image_size)
            overlay_png = _png(overlay(view, record.image_map), image_size)
            truth = _truth(row, size, image)
            if truth is not None and "image/pointing_game" not in extra:  # else the run's own values
                values.update(ground_truth_metrics(record.image_map, truth, tolerance))
        else:
            stored = _stored_overlay(directory, sample_id)
            overlay_png = _png(stored if stored is not None else Image.fromarray(colour_ramp(record.image_map)),
                               image_size)
    elif image is not None:
        picture = _png(image, image_size)
    values.update(extra)
    for k, v in values.items():
        totals.setdefault(k, []).append(v)
    return _card(record, picture, overlay_png, caption if isinstance(caption, str) else None, values)


def _find_rows(data: str, wanted: set[str], split: str, id_column: str,
               image_column: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(id, row)`` for the rows of ``data`` whose id is in ``wanted`` (the first row of each id), as
    the stream reaches them; the stream stops once all are found. The ids never found are warned about."""
    found: set[str] = set()
    if not wanted:
        return
    for row in _data_rows(data, split, image_column):
        sample_id = str(row.get(id_column))
        if sample_id in wanted and sample_id not in found:
            found.add(sample_id)
            yield sample_id, row
            if len(found) == len(wanted):
                break
    if wanted - found:
        log.warning("report: %d of %d samples are not in %s (column %r)", len(wanted - found), len(wanted),
                    data, id_column)


def _stored_overlay(directory: Path, sample_id: str) -> Image.Image | None:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", sample_id)  # the writer's file naming
    path = directory / OVERLAYS / f"{safe}.png"
    return Image.open(path).convert("RGB") if path.is_file() else None


def _page(title: str, records: Any, ids: Sequence[str], cards: Sequence[str], totals: Mapping[str, list[float]],
          per_page: int, data: str | None, results: Mapping[str, Any] | None = None, *, select: str = "store",
          nav: str = "", files: str = "", index: bool = True, shown: str | None = None) -> str:
    """One HTML file: the index parts (means, evaluation, settings, skips) when ``index``, the
    ``cards`` with their paging bar when there are any, ``files`` (the index's table of page files)
    and ``nav`` (a page file's links). ``totals`` holds every number seen so far (means in the
    index, sort keys everywhere); ``shown`` replaces the count of samples under the title."""
    meta = {k: v for k, v in records.metadata.items()
            if isinstance(v, str | int | float | bool | list | dict) or v is None}
    settings = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(json.dumps(v))}</td></tr>"
                       for k, v in sorted(meta.items()))
    summary = "".join(f"<tr><td>mean {html.escape(k)}</td><td>{_fmt(float(np.mean(v)))}</td><td>over {len(v)}</td></tr>"
                      for k, v in totals.items())
    evaluation = ""
    if results and results.get("metrics"):
        better = results.get("higher_is_better", {})
        counts = results.get("samples", {})
        rows = "".join(
            f"<tr><td>{html.escape(k)} {'&uarr;' if better.get(k) else '&darr;' if k in better else ''}</td>"
            f"<td>{'-' if v is None else _fmt(float(v))}</td><td>over {html.escape(str(counts.get(k, '?')))}</td></tr>"
            for k, v in results["metrics"].items())
        evaluation = f"<details open><summary>Evaluation of the whole run (results.json)</summary>" \
                     f"<table class=\"s\">{rows}</table></details>"
    options = "".join(f'<option value="-{_attr(k)}">{html.escape(k)} (high first)</option>'
                      f'<option value="{_attr(k)}">{html.escape(k)} (low first)</option>' for k in totals)
    skipped = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in records.skipped.items())
    repaired = getattr(records, "repaired", {})  # explained in a repaired form (e.g. caption truncated)
    fixed = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape('; '.join(v))}</li>" for k, v in repaired.items())
    first = "high" if select.startswith("-") else "low"
    order = "" if select == "store" else f", by {select.removeprefix('-')} ({first} first)"
    if shown is None:
        shown = f"{len(ids)} of {len(records)} records" + (
            f" (first {len(ids)}{order})" if len(ids) < len(records) else order)
    ramp = ", ".join(f"rgb{tuple(int(c) for c in colour_ramp(np.array([[v]]))[0, 0])}" for v in np.linspace(0, 1, 9))
    head = f'<table class="s">{summary}</table>{evaluation}' if index else ""
    tail = "" if not index else (
        f'<details><summary>Run settings</summary><table class="s">{settings}</table></details>'
        f"<details><summary>Skipped samples ({len(records.skipped)})</summary><ul>{skipped}</ul></details>"
        f"<details><summary>Repaired samples ({len(repaired)})</summary><ul>{fixed}</ul></details>")
    grid = script = ""
    if cards:
        start = "store order" if select == "store" else f"report order ({html.escape(select)})"
        grid = f"""
<p style="font-size:13px">Image map: <span class="legend" style="background:linear-gradient(to right, {ramp})">
</span> low &rarr; high. Tokens: <span class="tok" style="background:rgba(230,80,20,0.1)">low</span>
<span class="tok" style="background:rgba(230,80,20,0.55)">mid</span>
<span class="tok" style="background:rgba(230,80,20,1)">high</span> (hover a token for its score).</p>
<div class="bar"><button id="prev">&larr; prev</button><span id="pageinfo">all samples</span>
<button id="next">next &rarr;</button><input id="filter" placeholder="filter by id or caption" size="28">
<select id="sort"><option value="">{start}</option>{options}</select></div>
<div class="grid" id="grid" data-per-page="{per_page}">{"".join(cards)}</div>
"""
        script = f"<script>{_JS}</script>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} - M2IB report</title><style>{_CSS}</style></head>
<body><header><h1>{html.escape(title)}</h1>
<div class="sub">M2IB attribution report &middot; {shown} &middot; {len(records.skipped)} skipped
{'&middot; data: ' + html.escape(str(data)) if data else ''}</div></header>
<main>{nav}{head}{files}{grid}{tail}{nav}</main>{script}</body></html>
"""


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m m2ib_lightning.report OUTPUT_DIR [--data FILE] [-o report.html]``."""
    parser = argparse.ArgumentParser(prog="python -m m2ib_lightning.report",
                                     description="Write a self-contained HTML report of an M2IB run.")
    parser.add_argument("output_dir", help="attribution output directory (writer.output_dir)")
    parser.add_argument("-o", "--out", help="HTML file to write (default: OUTPUT_DIR/report.html)")
    parser.add_argument("--data", help="the run's data file (.jsonl/.parquet/.csv) or dataset id, for images, "
                                       "captions and ground truth")
    parser.add_argument("--split", default="train", help="dataset split of --data")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--text-column", default="caption")
    parser.add_argument("--metrics", help="JSON lines of per-sample numbers: {\"id\": ..., \"name\": value}")
    parser.add_argument("--model", help="checkpoint directory for the image processor (default: the run's backbone)")
    parser.add_argument("--limit", type=int, default=500, help="most samples in the report (0: all)")
    parser.add_argument("--per-page", type=int, default=24, help="samples per page")
    parser.add_argument("--per-file", type=int, default=500,
                        help="samples per HTML file; more make the report an index of page files")
    parser.add_argument("--select", default="store",
                        help="order samples enter the report in, from the whole run: store, similarity "
                             "(lowest first), -similarity (highest first), or [-]NAME of a --metrics number")
    parser.add_argument("--image-size", type=int, default=224, help="longest side of embedded images (0: map size)")
    parser.add_argument("--tolerance", type=float, default=15.0, help="pointing-game tolerance in map pixels")
    parser.add_argument("--title", help="page title")
    args = parser.parse_args(argv)
    path = build_report(
        args.output_dir, args.out, args.data, split=args.split, id_column=args.id_column,
        image_column=args.image_column, text_column=args.text_column, metrics=args.metrics, model=args.model,
        limit=args.limit or None, per_page=args.per_page, per_file=args.per_file, select=args.select,
        image_size=args.image_size or None,
        tolerance=args.tolerance, title=args.title,
    )
    pages = sorted(path.with_name(f"{path.stem}-pages").glob("page-*.html"))
    size = sum(p.stat().st_size for p in [path, *pages]) / 1e6
    print(f"wrote {path} ({size:.1f} MB" + (f", index of {len(pages)} page files)" if pages else ")"))
    return path


if __name__ == "__main__":
    main()
