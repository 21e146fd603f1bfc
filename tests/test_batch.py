"""`vlm-xray batch` / vlm.batch.run_batch: outputs, bad files, resume, hostile names, CSV input lists."""
import csv
import json
import os
import re
import shutil
import time

import pytest
from click.testing import CliRunner

from vlm.batch import collect_inputs, output_names, run_batch
from vlm.cli import main
from vlm.labels import load_label_set
from vlm.models import load_model
from vlm.results import ImageResult
from vlm.scoring import Scorer

HOSTILE = "<script>alert(1)<script>"  # '/' cannot be part of a file name
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@pytest.fixture(scope="module")
def backbone(openclip_dir):
    return load_model(str(openclip_dir))


def make_scorer(backbone, counter=None):
    s = Scorer(backbone, load_label_set("chestxray14"), variants="original,hflip", num_workers=0, batch_size=4)
    if counter is not None:
        orig = type(backbone).encode_images

        def counting(pixels):
            counter["images"] += pixels.shape[0] // len(s.variants)
            return orig(s.backbone, pixels)

        s.backbone = type(backbone)(**{**backbone.__dict__})  # a copy we can patch
        s.backbone.encode_images = counting
    return s


@pytest.fixture
def inputs(image_dir, corrupt_file):
    hostile = image_dir / f"{HOSTILE}.png"
    shutil.copy(image_dir / "grey8.png", hostile)
    return image_dir, corrupt_file, hostile


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def check_outputs_parse(out):
    for p in (out / "reports").glob("*.json"):
        ImageResult.from_dict(json.loads(p.read_text()))
    for p in (out / "reports").glob("*.html"):
        assert p.read_text().rstrip().endswith("</html>")
    json.loads((out / "findings.json").read_text())
    read_csv(out / "findings.csv")
    read_csv(out / "errors.csv")


def test_batch_outputs_bad_file_and_hostile_names(backbone, inputs, tmp_path):
    image_dir, corrupt, hostile = inputs
    out = tmp_path / "out"
    clinical = "<img src=x onerror=alert(3)> =cmd|' /C calc'!A0"
    s = run_batch(make_scorer(backbone), [str(image_dir), str(corrupt)], out, threshold=0.4, clinical=clinical,
                  progress=False, chunk_size=2)
    assert s.total == 6 and s.scored == 5 and len(s.failed) == 1
    errors = read_csv(out / "errors.csv")
    assert [e["image"] for e in errors] == [str(corrupt)] and "not a recognised image" in errors[0]["error"]
    reports = sorted((out / "reports").iterdir())
    assert len(reports) == 10  # html + json per good image
    for p in reports:
        assert SAFE_NAME.match(p.name), p.name
    assert (out / "assets" / "plotly.min.js").is_file() and (out / "index.html").is_file()
    rows = read_csv(out / "findings.csv")
    assert len(rows) == 5 * 14 and {r["label"] for r in rows} == set(load_label_set("chestxray14").names)
    assert len(json.loads((out / "findings.json").read_text())) == 5 * 14
    check_outputs_parse(out)

    index = (out / "index.html").read_text()
    assert index.count('href="reports/') == 10  # report + its json per image
    assert "<script>alert" not in index and "&lt;script&gt;alert(1)&lt;script&gt;" in index
    assert "<img src=x" not in index and "broken.png" in index
    assert "cdn" not in index.lower().split("<script src=")[0] and '<script src="assets/plotly.min.js">' in index
    name = output_names([hostile])[str(hostile)]
    page = (out / "reports" / f"{name}.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page and "&lt;script&gt;alert(1)" in page
    assert f'href="{name}.json"' in page and '<script src="../assets/plotly.min.js">' in page
    raw = (out / "reports" / f"{name}.json").read_text()
    assert "<" not in raw and json.loads(raw)["image"] == str(hostile) and json.loads(raw)["clinical"] == clinical
    assert "<" not in (out / "findings.json").read_text()
    # the CSV keeps the real path (quoted) and neutralises spreadsheet formulas
    assert any(r["image"] == str(hostile) for r in rows)


def test_resume_recomputes_nothing_and_threshold_change_recomputes(backbone, inputs, tmp_path):
    image_dir, corrupt, _ = inputs
    out = tmp_path / "out"
    counter = {"images": 0}
    run_batch(make_scorer(backbone, counter), [str(image_dir), str(corrupt)], out, 0.4, progress=False)
    assert counter["images"] == 5
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "reports").iterdir()}
    counter["images"] = 0
    s = run_batch(make_scorer(backbone, counter), [str(image_dir), str(corrupt)], out, 0.4, progress=False)
    assert counter["images"] == 0 and s.scored == 0 and s.resumed == 5 and len(s.failed) == 1
    assert {p: p.stat().st_mtime_ns for p in (out / "reports").iterdir()} == mtimes
    assert len(read_csv(out / "findings.csv")) == 5 * 14
    # a different threshold is a different result: everything is scored again
    s = run_batch(make_scorer(backbone, counter), [str(image_dir)], out, 0.6, progress=False)
    assert counter["images"] == 5 and s.resumed == 0
    assert all(json.loads(p.read_text())["threshold"] == 0.6 for p in (out / "reports").glob("*.json"))


def test_a_batch_without_html_reports_writes_the_same_findings_and_adds_pages_later(backbone, inputs, tmp_path):
    image_dir, corrupt, _ = inputs
    counter = {"images": 0}
    with_pages, without = tmp_path / "pages", tmp_path / "json-only"
    run_batch(make_scorer(backbone), [str(image_dir), str(corrupt)], with_pages, 0.4, progress=False)
    s = run_batch(make_scorer(backbone, counter), [str(image_dir), str(corrupt)], without, 0.4, progress=False,
                  html_reports=False)
    assert s.scored == 5 and len(s.failed) == 1
    assert not list((without / "reports").glob("*.html")) and len(list((without / "reports").glob("*.json"))) == 5
    for name in ("findings.csv", "findings.json", "errors.csv"):
        assert (without / name).read_bytes() == (with_pages / name).read_bytes()
    index = (without / "index.html").read_text()
    names = [p.stem for p in (without / "reports").glob("*.json")]
    assert all(f'href="reports/{n}.json"' in index and f"reports/{n}.html" not in index for n in names)
    assert "run with --no-html-reports" in index  # the page says why its links open JSON
    check_outputs_parse(without)
    # the same batch with pages: resumed (nothing scored again), each page rendered from its JSON
    counter["images"] = 0
    s = run_batch(make_scorer(backbone, counter), [str(image_dir), str(corrupt)], without, 0.4, progress=False)
    assert counter["images"] == 0 and s.resumed == 5 and s.rerendered == 5
    assert sorted(p.name for p in (without / "reports").glob("*.html")) == \
        sorted(p.name for p in (with_pages / "reports").glob("*.html"))
    index = (without / "index.html").read_text()
    assert all(f'href="reports/{n}.html"' in index for n in names) and "run with --no-html-reports" not in index
    # and without them again, with new clinical text: no page is left to show the old text
    s = run_batch(make_scorer(backbone, counter), [str(image_dir), str(corrupt)], without, 0.4, progress=False,
                  clinical="new history", html_reports=False)
    assert counter["images"] == 0 and s.rerendered == 5 and not list((without / "reports").glob("*.html"))


def test_interrupted_batch_resumes(backbone, inputs, tmp_path):
    image_dir, _, _ = inputs
    out = tmp_path / "out"
    counter = {"images": 0}
    scorer = make_scorer(backbone, counter)

    class DyingEngine:  # the local engine, killed after it has scored two images
        def results(self, scorer, paths, threshold):
            from vlm.engines import get_engine

            for k, result in enumerate(get_engine("local").results(scorer, paths, threshold)):
                if k == 2:
                    raise KeyboardInterrupt
                yield result

    with pytest.raises(KeyboardInterrupt):
        run_batch(scorer, [str(image_dir)], out, 0.4, progress=False, chunk_size=2, engine=DyingEngine())
    assert len(list((out / "reports").glob("*.json"))) == 2 and not (out / "index.html").exists()
    check_outputs_parse(out) if (out / "findings.json").exists() else None
    counter["images"] = 0
    s = run_batch(make_scorer(backbone, counter), [str(image_dir)], out, 0.4, progress=False, chunk_size=2)
    assert counter["images"] == 3 and s.resumed == 2 and s.scored == 3
    check_outputs_parse(out)
    assert not list(out.rglob("*.tmp"))


def test_csv_input_list_and_name_collisions(backbone, image_dir, tmp_path):
    sub = tmp_path / "other"
    sub.mkdir()
    shutil.copy(image_dir / "grey8.png", sub / "grey8.png")  # same stem, different folder
    lst = tmp_path / "list.csv"
    lst.write_text("filename,labels,view\nimgs/grey8.png,Effusion,PA\nother/grey8.png,,\nimgs/rgb.jpg,No Finding,AP\n")
    paths = collect_inputs([str(lst)])
    assert [p.name for p in paths] == ["grey8.png", "grey8.png", "rgb.jpg"]
    names = output_names(paths)
    assert len(set(names.values())) == 3
    s = run_batch(make_scorer(backbone), [str(lst)], tmp_path / "out", 0.5, progress=False)
    assert s.scored == 3 and not s.failed
    assert [r.view for r in s.results] == ["PA", None, "AP"]  # the list's view column
    page = (tmp_path / "out" / "reports" / f"{names[str(paths[0])]}.html").read_text()
    assert "View: PA" in page
    bad = tmp_path / "bad.csv"
    bad.write_text("path,labels\nx.png,\n")
    with pytest.raises(ValueError, match="filename"):
        collect_inputs([str(bad)])


def test_output_names_are_safe_and_unique(tmp_path):
    paths = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "../../etc/passwd.png",
             tmp_path / f"{HOSTILE}.png", tmp_path / "..png", tmp_path / "X.PNG"]
    names = output_names(paths)
    assert len({n.lower() for n in names.values()}) == len(paths)
    for n in names.values():
        assert SAFE_NAME.match(n) and not n.startswith(".") and "/" not in n


def test_cli_batch(openclip_dir, inputs, tmp_path):
    image_dir, corrupt, _ = inputs
    out = tmp_path / "cli"
    args = ["batch", str(image_dir / "*.png"), str(corrupt), "--model", str(openclip_dir), "--out", str(out),
            "--threshold", "0.4", "--variants", "original", "--clinical", "hostile <b>text</b>"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output  # one input failed, the rest done
    assert "4 scored" in r.output and "broken.png" in r.output
    assert len(list((out / "reports").glob("*.html"))) == 4
    r = CliRunner().invoke(main, args)
    assert "0 scored, 4 already done" in r.output
    r = CliRunner().invoke(main, ["batch", str(tmp_path / "nothing*.png"), "--model", str(openclip_dir),
                                  "--out", str(out)])
    assert r.exit_code == 2 and "no images found" in r.output


# ----------------------------------------------------------------------------- real-world inputs (issue 13)

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tests.corpus import make_corpus

    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


def _rel(root, path):
    return os.path.relpath(path, root)  # outputs already show paths as printable text


def test_mixed_corpus_every_entry_scored_or_listed(backbone, corpus, tmp_path, openclip_dir):
    root, expected = corpus
    out = tmp_path / "out"
    t0 = time.perf_counter()
    scorer = Scorer(backbone, load_label_set("chestxray14"), variants="original", num_workers=0, batch_size=8)
    s = run_batch(scorer, [str(root)], out, 0.5, progress=False, chunk_size=8)
    seconds = time.perf_counter() - t0
    scored = {_rel(root, r.image): r for r in s.results}
    errors = {_rel(root, e["image"]): e["error"] for e in read_csv(out / "errors.csv")}
    for entry, exp in expected.items():
        if exp.outcome == "scored":
            assert entry in scored, entry
            if exp.reason:  # an input warning: first frame, lateral view, body part
                assert any(exp.reason in w for w in scored[entry].input_warnings), scored[entry].input_warnings
        elif exp.outcome == "failed":
            assert exp.reason in errors[entry], (entry, errors.get(entry))
        else:
            assert entry not in scored and entry not in errors
    assert set(scored) | set(errors) == {e for e, x in expected.items() if x.outcome != "not_image"}
    assert s.not_images == 4 and s.duplicates == 1 and s.exit_code == 1 and s.total == len(scored) + len(errors)
    assert f"{len(scored)} scored" in str(s) and "4 non-image files ignored" in str(s)
    lateral = json.loads((out / "reports" / f"{output_names([root / 'dicom/lateral.dcm'])[str(root / 'dicom/lateral.dcm')]}.json").read_text())
    assert lateral["view"] == "LL" and "lateral view" in lateral["input_warnings"][0]
    check_outputs_parse(out)
    print(f"mixed corpus: {len(scored)} scored, {len(errors)} listed, {s.not_images} not images, {seconds:.1f} s")
    r = CliRunner().invoke(main, ["batch", str(root), "--model", str(openclip_dir), "--out", str(tmp_path / "cli"),
                                  "--variants", "original", "--threshold", "0.5"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert len(read_csv(tmp_path / "cli" / "errors.csv")) == len(errors)


def test_overwrite_replaces_a_batch_and_refuses_other_folders(backbone, image_dir, tmp_path):
    from vlm.batch import BatchOutputError

    out = tmp_path / "out"
    run_batch(make_scorer(backbone), [str(image_dir)], out, 0.4, progress=False)
    (out / "reports" / "left-over.json").write_text("{}")
    s = run_batch(make_scorer(backbone), [str(image_dir / "grey8.png")], out, 0.4, progress=False, overwrite=True)
    assert s.resumed == 0 and s.scored == 1 and len(list((out / "reports").iterdir())) == 2
    assert json.loads((out / "batch.json").read_text())["settings"]["threshold"] == 0.4
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_text("not a batch")
    with pytest.raises(BatchOutputError, match="not a vlm-xray batch folder"):
        run_batch(make_scorer(backbone), [str(image_dir)], mine, 0.4, progress=False, overwrite=True)
    assert (mine / "thesis.docx").is_file() and not (mine / "reports").exists()


def test_a_smaller_batch_in_the_same_folder_leaves_no_stale_reports(backbone, image_dir, tmp_path):
    out = tmp_path / "out"
    run_batch(make_scorer(backbone), [str(image_dir)], out, 0.4, progress=False)
    s = run_batch(make_scorer(backbone), [str(image_dir / "rgb.jpg")], out, 0.4, progress=False)
    assert s.resumed == 1 and s.scored == 0
    assert sorted(p.suffix for p in (out / "reports").iterdir()) == [".html", ".json"]
    assert {r["image"] for r in read_csv(out / "findings.csv")} == {str(image_dir / "rgb.jpg")}


def test_output_folder_errors_fail_fast_and_resume(backbone, image_dir, tmp_path, monkeypatch, openclip_dir):
    import errno

    import vlm.batch as batch
    from vlm.batch import BatchOutputError

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(BatchOutputError, match="cannot write to the output folder"):
        run_batch(make_scorer(backbone), [str(image_dir)], blocker / "out", 0.4, progress=False)
    r = CliRunner().invoke(main, ["batch", str(image_dir), "--model", str(openclip_dir), "--out",
                                  str(blocker / "out"), "--variants", "original"])
    assert r.exit_code == 2 and "cannot write to the output folder" in r.output and "Traceback" not in r.output

    real, calls = batch.atomic_write_text, {"n": 0}

    def disk_fills_up(path, text):
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, text)

    monkeypatch.setattr(batch, "atomic_write_text", disk_fills_up)
    out = tmp_path / "out"
    with pytest.raises(BatchOutputError, match="No space left on device; finished reports are kept"):
        run_batch(make_scorer(backbone), [str(image_dir)], out, 0.4, progress=False, chunk_size=1)
    monkeypatch.setattr(batch, "atomic_write_text", real)
    assert len(list((out / "reports").glob("*.json"))) == 2  # html+json of two images, then the disk was full
    s = run_batch(make_scorer(backbone), [str(image_dir)], out, 0.4, progress=False)
    assert s.resumed == 2 and s.scored == 2 and s.exit_code == 0


KILLABLE_BATCH = """
import sys
from vlm.batch import run_batch
from vlm.labels import load_label_set
from vlm.models import load_model
from vlm.scoring import Scorer

model, inputs, out = sys.argv[1:4]
scorer = Scorer(load_model(model), load_label_set("chestxray14"), variants="original,hflip", num_workers=0,
                batch_size=3)
sys.exit(run_batch(scorer, [inputs], out, threshold=0.5, progress=False, chunk_size=2).exit_code)
"""


def _n_done(out):
    return len(list((out / "reports").glob("*.json"))) if (out / "reports").is_dir() else 0


@pytest.mark.slow
def test_batch_killed_at_random_points_resumes_to_identical_findings(backbone, openclip_dir, tmp_path):
    """SIGKILL a real batch process at seeded random moments (start-up, mid-chunk, mid-write), re-run it:
    findings.csv/json and errors.csv equal an uninterrupted run's byte for byte."""
    import random
    import signal
    import subprocess
    import sys

    from tests.corpus import dicom_dataset, quantise, save_dicom, source_pixels
    from PIL import Image as PILImage

    src = tmp_path / "in"
    src.mkdir()
    n_images = 40  # enough that three kills a few reports apart always land before the end
    for i, px in enumerate(source_pixels(n_images)):
        if i % 3:
            PILImage.fromarray(quantise(px, 8)).save(src / f"img{i:02d}.png")
        else:
            save_dicom(dicom_dataset(quantise(px, 12), bits_stored=12, uid_seed=str(i)), src / f"img{i:02d}.dcm")
    (src / "img99.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ref = tmp_path / "ref"
    scorer = Scorer(backbone, load_label_set("chestxray14"), variants="original,hflip", num_workers=0, batch_size=3)
    assert run_batch(scorer, [str(src)], ref, 0.5, progress=False, chunk_size=2).exit_code == 1

    out, rng, kills = tmp_path / "killed", random.Random(13), 0
    cmd = [sys.executable, "-c", KILLABLE_BATCH, str(openclip_dir), str(src), str(out)]
    # first kill: a random moment of start-up (model load, folder set-up); then twice once a random number of
    # further reports exist, plus a random few ms (mid-chunk or mid-write)
    for attempt in range(3):
        target = _n_done(out) + (0 if attempt == 0 else rng.randint(1, 4))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + (rng.uniform(0.2, 3.0) if attempt == 0 else 120)
        while proc.poll() is None and _n_done(out) <= target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.01))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    assert kills == 3 and 0 < _n_done(out) < n_images
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert final.returncode == 1 and "Traceback" not in final.stderr, final.stderr
    for name in ("findings.csv", "findings.json", "errors.csv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert _n_done(out) == n_images and not list(out.rglob("*.tmp*"))


def test_batch_streams_results_instead_of_keeping_them(backbone, inputs, tmp_path, monkeypatch):
    """Memory at scale: each result is dropped once its report is written (the index, findings and charts
    come from compact records spooled to disk); the streamed findings equal the whole-list form byte for
    byte (formula cells neutralised), and no spool file is left behind."""
    import gc
    import weakref

    import vlm.batch as batch_mod
    from vlm.report import safe_json
    from vlm.results import FINDINGS_CSV_COLUMNS, findings_rows

    image_dir, corrupt, _ = inputs
    shutil.copy(image_dir / "grey8.png", image_dir / "=HYPERLINK(1).png")
    scorer = make_scorer(backbone)
    alive: list[weakref.ref] = []
    real_outcome = scorer.outcome

    def tracked(enc, thr):
        out = real_outcome(enc, thr)
        alive.append(weakref.ref(out))
        return out

    scorer.outcome = tracked
    live_at_end = []
    real_index = batch_mod.write_index

    def counting_index(*args, **kwargs):
        gc.collect()
        live_at_end.append(sum(r() is not None for r in alive))
        return real_index(*args, **kwargs)

    monkeypatch.setattr(batch_mod, "write_index", counting_index)
    out = tmp_path / "out"
    s = run_batch(scorer, [str(image_dir), str(corrupt)], out, threshold=0.4, progress=False, chunk_size=2)
    assert s.scored == 6 and len(alive) == 6
    assert live_at_end == [0]  # no ImageResult survives until the index is written
    results = s.results  # read back from the reports on disk, input order
    assert [r.image for r in results] == [r["image"] for r in read_csv(out / "findings.csv")][::14]
    rows = findings_rows(results)
    assert (out / "findings.csv").read_bytes() == batch_mod._safe_csv(rows, FINDINGS_CSV_COLUMNS).encode()
    assert (out / "findings.json").read_bytes() == (safe_json(rows) + "\n").encode()
    index = (out / "index.html").read_text()
    assert index.count('href="reports/') == 12 and "Batch report: 6 images, 1 failed" in index
    assert not list(out.glob(".*.tmp*"))  # the spool file is removed
    # an empty batch (every input failed) still writes valid, empty findings
    s = run_batch(make_scorer(backbone), [str(corrupt)], tmp_path / "none", progress=False)
    assert s.scored == 0 and json.loads((tmp_path / "none" / "findings.json").read_text()) == []
    assert read_csv(tmp_path / "none" / "findings.csv") == []


def test_thread_writer_fallback_writes_the_same_batch(backbone, inputs, tmp_path, monkeypatch):
    """Where fork is missing the reports are written by a thread: the same findings and errors, byte for byte."""
    from vlm.engines import ProcessWriter

    image_dir, corrupt, _ = inputs
    args = ([str(image_dir), str(corrupt)],)
    run_batch(make_scorer(backbone), *args, tmp_path / "proc", threshold=0.4, progress=False, chunk_size=2)
    monkeypatch.setattr(ProcessWriter, "available", staticmethod(lambda: False))
    s = run_batch(make_scorer(backbone), *args, tmp_path / "thread", threshold=0.4, progress=False, chunk_size=2)
    assert s.scored == 5 and len(s.failed) == 1
    for name in ("findings.csv", "findings.json", "errors.csv"):
        assert (tmp_path / "thread" / name).read_bytes() == (tmp_path / "proc" / name).read_bytes()
