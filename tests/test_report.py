"""What users look at: the HTML report (also rendered in headless Chromium) and TensorBoard maps."""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from m2ib_lightning import TensorBoardMaps, load_attributions
from m2ib_lightning.report import build_report, token_html
from m2ib_lightning.report import main as report_main
from m2ib_lightning.run.cli import main

ROOT = Path(__file__).resolve().parents[1]


class Tags(HTMLParser):
    """Collects every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags(page: str) -> list[tuple[str, dict[str, str]]]:
    parser = Tags()
    parser.feed(page)
    return parser.tags


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_clip_dir, pairs_dir) -> Path:
    """One small fit with a TensorBoard logger, the TensorBoardMaps callback and two writer overlays."""
    root = tmp_path_factory.mktemp("report-run")
    extra = root / "tb.yaml"
    extra.write_text(json.dumps({"trainer": {
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": str(root), "name": "tb"}},
        "callbacks": [{"class_path": "m2ib_lightning.TensorBoardMaps", "init_args": {"n": 3}}],
    }}))
    main([
        "fit", "-c", str(ROOT / "configs" / "demo.yaml"), "-c", str(extra),
        "--model.init_args.backbone.init_args.model", str(tiny_clip_dir),
        "--model.init_args.vision_layer", "1", "--model.init_args.text_layer", "1",
        "--model.init_args.steps", "2", "--model.init_args.copies", "2",
        "--data.init_args.data_files", str(pairs_dir / "pairs.jsonl"), "--data.init_args.batch_size", "4",
        "--trainer.default_root_dir", str(root), "--writer.overlays", "2",
    ])
    return root


def test_report_with_the_data(run, pairs_dir, tmp_path):
    path = build_report(run / "attributions", tmp_path / "r.html", data=str(pairs_dir / "pairs.jsonl"))
    page = path.read_text()
    found = tags(page)
    cards = [a for t, a in found if t == "div" and a.get("class") == "card"]
    images = [a["src"] for t, a in found if t == "img"]
    assert len(cards) == 6 and len(images) == 12 and all(s.startswith("data:image/png;base64,") for s in images)
    # Self-contained: no resource or link leaves the file.
    assert not [a for t, a in found if t in ("link", "script", "iframe") and (a.get("src") or a.get("href"))]
    assert "http://" not in page and "https://" not in page
    first = json.loads((pairs_dir / "pairs.jsonl").read_text().splitlines()[0])
    assert first["caption"] in page and first["id"] in page
    assert page.count('class="tok"') >= 6 * 4
    # The demo pairs have boxes: per-sample ground-truth metrics, and their means in the summary.
    assert "pointing_game" in page and "energy_pointing_game" in page and "mean similarity" in page
    assert all(0 <= float(c["data-energy-pointing-game"]) <= 1 for c in cards)


def test_report_pointing_game_follows_the_map_size_like_the_evaluation(run, tmp_path):
    """15 px at 224 px is 6.43 px on a 96-px map, as ``evaluation.tolerance_units: relative``; ``pixels`` keeps 15."""
    from m2ib_lightning.report.cards import ground_truth_metrics

    image_map = np.zeros((96, 96), dtype=np.float32)
    image_map[48, 19] = 1  # 10 px right of the region
    truth = np.zeros((96, 96), dtype=bool)
    truth[:, :10] = True
    assert ground_truth_metrics(image_map, truth)["pointing_game"] == 0
    assert ground_truth_metrics(image_map, truth, 15, "pixels")["pointing_game"] == 1
    assert ground_truth_metrics(image_map, truth, 35)["pointing_game"] == 1  # 35 px at 224 px: 15 px here
    with pytest.raises(ValueError, match="tolerance_units one of"):
        build_report(run / "attributions", tmp_path / "x.html", tolerance_units="px")


def test_report_from_the_output_directory_alone(run):
    path = build_report(run / "attributions")
    assert path == run / "attributions" / "report.html"
    found = tags(path.read_text())
    images = [a for t, a in found if t == "img"]
    assert len(images) == 6  # the writer's 2 overlays, then the maps alone
    assert "input (model view)" not in path.read_text()


def test_report_limit_paging_and_metrics_file(run, tmp_path):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("".join(json.dumps({"id": f"demo-00{i}", "deletion_auc": i / 10, "note": "x"}) + "\n"
                               for i in range(6)))
    page = build_report(run / "attributions", tmp_path / "r.html", metrics=metrics, limit=4, per_page=2).read_text()
    assert "4 of 6 records" in page and 'data-per-page="2"' in page
    assert "deletion_auc" in page and "note" not in page


def test_report_selects_from_the_whole_run(run, tmp_path):
    records = load_attributions(run / "attributions")
    similarity = records.column("similarity")
    assert similarity.keys() == set(records) and all(similarity[i] == records[i].similarity for i in records)
    lowest = sorted(records, key=similarity.get)[:2]
    page = build_report(run / "attributions", tmp_path / "r.html", limit=2, select="similarity").read_text()
    cards = [a for t, a in tags(page) if t == "div" and a.get("class") == "card"]
    assert [c["data-search"].split()[0] for c in cards] == lowest and "by similarity (low first)" in page

    metrics = tmp_path / "m.jsonl"  # a number of the metrics file; samples without it come last
    metrics.write_text("".join(json.dumps({"id": f"demo-00{i}", "deletion_auc": i / 10}) + "\n" for i in (1, 4, 2)))
    page = build_report(run / "attributions", tmp_path / "m.html", metrics=metrics, select="-deletion_auc").read_text()
    order = [a["data-search"].split()[0] for t, a in tags(page) if t == "div" and a.get("class") == "card"]
    assert order[:3] == ["demo-004", "demo-002", "demo-001"] and len(order) == 6
    with pytest.raises(ValueError, match=r"select must be .*\['deletion_auc'\], got 'pointing'"):
        build_report(run / "attributions", tmp_path / "x.html", metrics=metrics, select="pointing")


def test_large_report_is_an_index_of_page_files(run, pairs_dir, tmp_path, monkeypatch):
    data = str(pairs_dir / "pairs.jsonl")
    from m2ib_lightning.report import samples

    passes = []
    read = samples.open_rows  # the data layer's reader, as the report uses it

    def counted(*args, **kwargs):
        passes.append(args)
        return read(*args, **kwargs)

    monkeypatch.setattr(samples, "open_rows", counted)
    index = build_report(run / "attributions", tmp_path / "r.html", data=data, per_file=4, per_page=2)
    assert len(passes) == 1  # the data is read once, however many page files there are
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r-pages", "r.html"]  # no spool file left
    pages = sorted((tmp_path / "r-pages").glob("*.html"))
    assert [p.name for p in pages] == ["page-00001.html", "page-00002.html"]
    page = index.read_text()
    # The index: means over every sample, the settings and skips, links to the files, no cards.
    assert "mean similarity" in page and "over 6" in page and "Run settings" in page
    assert [a["href"] for t, a in tags(page) if t == "a"] == ["r-pages/page-00001.html", "r-pages/page-00002.html"]
    assert not [a for t, a in tags(page) if t == "div" and a.get("class") == "card"]
    seen = []
    for n, path in enumerate(pages):
        found = tags(path.read_text())
        cards = [a for t, a in found if t == "div" and a.get("class") == "card"]
        seen += [c["data-search"].split()[0] for c in cards]
        links = {a["href"] for t, a in found if t == "a"}
        assert "../r.html" in links and (("page-00002.html" in links) == (n == 0))
        assert all(a["src"].startswith("data:image/png;base64,") for t, a in found if t == "img")
        assert 'data-per-page="2"' in path.read_text() and "<script>" in path.read_text()
    assert seen == list(load_attributions(run / "attributions"))  # every sample once, in order
    # A shorter report written to the same place removes the page files it no longer has.
    build_report(run / "attributions", tmp_path / "r.html", data=data, per_file=500)
    assert not list((tmp_path / "r-pages").glob("*.html"))
    with pytest.raises(ValueError, match="per_file must be an int >= 1"):
        build_report(run / "attributions", tmp_path / "r.html", per_file=0)


def test_report_command_line(run, pairs_dir, tmp_path, capsys):
    out = tmp_path / "cli.html"
    report_main([str(run / "attributions"), "--data", str(pairs_dir / "pairs.jsonl"), "-o", str(out),
                 "--per-page", "4", "--image-size", "48", "--tolerance", "10", "--tolerance-units", "pixels"])
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out
    first = next(a["src"] for t, a in tags(out.read_text()) if t == "img")
    import base64
    import io

    png = Image.open(io.BytesIO(base64.b64decode(first.split(",", 1)[1])))
    assert png.size == (48, 48)


class Texts(HTMLParser):
    """The text inside each element of class ``cls`` (or each ``<cls>`` tag)."""

    def __init__(self, cls: str) -> None:
        super().__init__()
        self.cls, self.depth, self.texts = cls, 0, []

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += 1
            self.texts[-1] += " "  # between cells
        elif self.cls in (tag, dict(attrs).get("class")):
            self.depth = 1
            self.texts.append("")

    def handle_endtag(self, tag):
        self.depth = max(self.depth - 1, 0)

    def handle_data(self, data):
        if self.depth:
            self.texts[-1] += data


def texts(page: str, cls: str) -> list[str]:
    parser = Texts(cls)
    parser.feed(page)
    return [" ".join(text.split()) for text in parser.texts]


def test_report_escapes_what_the_data_and_the_user_give(run, pairs_dir, tmp_path):
    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    caption = 'a <script>alert("caption")</script> & <b>bold</b> cat'
    rows[0]["caption"] = caption
    for row in rows:
        row["image"] = str(pairs_dir / row["image"])
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    name = '<img src=x onerror="alert(1)">&amp'
    metrics = tmp_path / "m.jsonl"
    metrics.write_text(json.dumps({"id": rows[0]["id"], name: 0.5}) + "\n")
    title = "<script>alert('title')</script> & co"
    page = build_report(run / "attributions", tmp_path / "r.html", data=str(data), metrics=metrics,
                        title=title).read_text()
    found = tags(page)
    # Nothing given became markup: one script (the report's own), no <b>, every <img> one of the
    # report's data URIs ...
    assert [t for t, _ in found].count("script") == 1 and page.count("<script") == 1 and "<b>" not in page
    assert all(set(a) == {"src", "alt"} and a["src"].startswith("data:image/png;base64,")
               for t, a in found if t == "img")
    assert "&lt;script&gt;alert(" in page and "&amp; &lt;b&gt;bold&lt;/b&gt; cat" in page
    # ... and everything reads back as given.
    assert texts(page, "cap")[0] == caption and texts(page, "h1") == [title]
    assert texts(page, "title") == [f"{title} - M2IB report"]
    card = next(a for t, a in found if t == "div" and a.get("class") == "card")
    assert card["data-search"] == f"{rows[0]['id']} {caption.lower()}"
    assert card["data--img-src-x-onerror--alert-1----amp"] == "0.5"
    assert f"{name} 0.5000" in texts(page, "m")[0] and f"mean {name} 0.5000 over 1" in texts(page, "s")[0]
    assert f"{name} (high first)" in texts(page, "option")


def test_tokens_are_escaped_and_shaded():
    html = token_html(["<|startoftext|>", "<script>", "red</w>", "\u2581cat"], [0.0, 0.5, 1.0, 0.25])
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "rgba(230,80,20,1.000)" in html and ">red<" in html and ">cat<" in html
    with pytest.raises(ValueError, match="expected one score per token, got 2 tokens and 1 scores"):
        token_html(["a", "b"], [1.0])


@pytest.fixture(scope="session")
def browser() -> str:
    """Headless Chromium, or a skip (session scope: checked before the module's run is built)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium not found (Debian: apt-get install -y chromium); the report was not rendered")
    return found


@pytest.mark.browser
def test_report_renders_in_headless_chromium(browser, run, pairs_dir, tmp_path):
    path = build_report(run / "attributions", tmp_path / "r.html", data=str(pairs_dir / "pairs.jsonl"), per_page=4)
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
             "--window-size=1200,900"]
    dom = subprocess.run([*flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120).stdout
    # The paging script ran: it wrote the page counter and hid the second page's cards.
    assert "page 1 of 2" in dom and dom.count('style="display: none;"') == 2
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (900, 1200, 3) and pixels.std() > 20  # not a blank page

    # A report split into page files: each file pages its own cards.
    build_report(run / "attributions", tmp_path / "big.html", data=str(pairs_dir / "pairs.jsonl"), per_page=2,
                 per_file=4)
    page = (tmp_path / "big-pages" / "page-00001.html").as_uri()
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert "page 1 of 2 \u00b7 4 of 4 samples" in dom and dom.count('style="display: none;"') == 2


def test_tensorboard_maps_are_logged(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run / "tb").glob("version_*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    images = sorted(acc.Tags()["images"])
    assert images == ["maps/demo-000", "maps/demo-001", "maps/demo-002"]
    picture = acc.Images("maps/demo-000")[0]
    assert (picture.width, picture.height) == (64, 64)
    assert "tokens/demo-000/text_summary" in acc.Tags()["tensors"]  # add_text stores a text tensor


def test_tensorboard_maps_without_a_tensorboard_logger_warns_once():
    from m2ib_lightning.records import Explanation

    callback = TensorBoardMaps(n=2)
    trainer = SimpleNamespace(loggers=[], is_global_zero=True, current_epoch=0)
    outputs = {"explanation": Explanation(ids=["a"], similarity=torch.zeros(1), image_maps=torch.zeros(1, 4, 4))}
    with pytest.warns(UserWarning, match=r"no TensorBoardLogger \(loggers: none\); nothing is logged"):
        callback.on_train_batch_end(trainer, None, outputs, {}, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        callback.on_train_batch_end(trainer, None, outputs, {}, 1)
    with pytest.raises(ValueError, match="n must be an int >= 0, got -1"):
        TensorBoardMaps(n=-1)


def test_model_view_without_a_processor_follows_clips_resize_and_crop(backbone):
    from m2ib_lightning.outputs.overlays import model_view

    gen = np.random.default_rng(0)
    image = Image.fromarray((gen.random((60, 90, 3)) * 40).astype(np.uint8) + 100)  # wide, low contrast
    image.paste((250, 20, 20), (40, 10, 60, 50))  # a red block near the centre
    exact = model_view(image, (64, 64), backbone.image_processor).astype(np.float32)
    assumed = model_view(image, (64, 64)).astype(np.float32)
    assert exact.shape == assumed.shape == (64, 64, 3)
    # Same geometry (resampling details aside): the block lands on the same pixels.
    assert np.abs(exact - assumed).mean() < 6 and np.abs((exact[..., 0] > 200) ^ (assumed[..., 0] > 200)).mean() < 0.02
