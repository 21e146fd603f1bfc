"""The embedding store (vlm.store): keys, the eviction rule, concurrent writers, repeat runs that cost
no encoder passes, a corrupt file, `vlm-xray cache info|prune`."""
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from vlm.cli import main
from vlm.labels import load_label_set
from vlm.models import load_model
from vlm.scoring import ImageEmbeddingCache, Scorer
from vlm.store import EmbeddingStore, open_store
from vlm.text_cache import TextEmbeddingCache


@pytest.fixture(scope="module")
def backbone(openclip_dir):
    return load_model(str(openclip_dir))


def vec(seed, d=8):
    return np.random.default_rng(seed).normal(size=(d,)).astype(np.float32)


def test_image_entries_are_keyed_by_model_content_prep_and_variant(tmp_path):
    store = EmbeddingStore(tmp_path)
    emb = np.stack([vec(1), vec(2)])
    store.put_images("m1", [("sha-a", "p1", ["original", "clahe"], emb, {"view": "PA"})])
    got, meta = store.get_image("m1", "sha-a", "p1", ["clahe", "original"])
    np.testing.assert_array_equal(got, emb[::-1])  # in the order asked for
    assert meta == {"view": "PA"}
    assert store.get_image("m1", "sha-a", "p1", ["original"])[0].shape == (1, 8)  # a subset is a hit
    for miss in [("m2", "sha-a", "p1", ["original"]), ("m1", "sha-b", "p1", ["original"]),
                 ("m1", "sha-a", "p2", ["original"]), ("m1", "sha-a", "p1", ["original", "gamma"])]:
        assert store.get_image(*miss) is None, miss


def test_eviction_drops_least_recently_used_first(tmp_path):
    store = EmbeddingStore(tmp_path, max_bytes=10 * 32)  # room for ten 8-float vectors
    for i in range(8):
        store.put_images("m", [(f"img{i}", "p", ["original"], vec(i)[None], {})])
        time.sleep(0.01)
    store.touch_images("m", [("img0", "p")])  # used again: now the most recent
    for i in range(8, 12):
        store.put_images("m", [(f"img{i}", "p", ["original"], vec(i)[None], {})])
        time.sleep(0.01)
    assert store.total_bytes() <= store.max_bytes
    present = {i for i in range(12) if store.get_image("m", f"img{i}", "p", ["original"]) is not None}
    assert 0 in present and 11 in present  # touched and newest survive
    assert 1 not in present and 2 not in present  # oldest untouched went first
    assert store.info()["models"]["m"]["images"] == len(present)


WRITER = """
import sys, numpy as np
from vlm.store import EmbeddingStore
store = EmbeddingStore(sys.argv[1])
who = sys.argv[2]
for i in range(150):
    store.put_images("m", [(f"{who}-{i}", "p", ["original", "hflip"], np.full((2, 16), i, np.float32), {"i": i})])
    store.put_texts("m", {f"{who}-t{i}": np.full(16, i, np.float32)})
    assert store.get_image("m", f"{who}-{i}", "p", ["hflip"]) is not None
print("ok")
"""


def test_two_processes_write_the_same_store_at_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), who], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for who in ("a", "b")]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    store = EmbeddingStore(tmp_path)
    info = store.info()["models"]["m"]
    assert info["images"] == 300 and info["image_vectors"] == 600 and info["texts"] == 300
    emb, meta = store.get_image("m", "b-149", "p", ["original", "hflip"])
    assert meta == {"i": 149} and float(emb[0, 0]) == 149.0


def counting(backbone):
    """A copy of the backbone whose image and text encoders count what passes through them."""
    counts = {"images": 0, "texts": 0}
    copy = type(backbone)(**{**backbone.__dict__})
    enc_img, enc_txt = copy.encode_images, copy.encode_texts

    def images(pixels):
        counts["images"] += pixels.shape[0]
        return enc_img(pixels)

    def texts(t):
        counts["texts"] += len(t)
        return enc_txt(t)

    copy.encode_images, copy.encode_texts = images, texts
    return copy, counts


def test_repeat_run_with_new_threshold_costs_no_encoder_pass(backbone, image_dir, tmp_path):
    paths = sorted(image_dir.iterdir())
    ls = load_label_set("chestxray14")
    b1, first = counting(backbone)
    s1 = Scorer(b1, ls, variants="original,clahe", num_workers=0, batch_size=3, image_cache=ImageEmbeddingCache(),
                text_cache=TextEmbeddingCache())
    r1 = list(s1.score(paths, threshold=0.3))
    assert first["images"] == 2 * len(paths) and first["texts"] > 0
    b2, second = counting(backbone)  # a new process would see the same: fresh cache objects, same store file
    cache = ImageEmbeddingCache()
    s2 = Scorer(b2, ls, variants="original,clahe", num_workers=2, batch_size=2, image_cache=cache,
                text_cache=TextEmbeddingCache())
    r2 = list(s2.score(paths, threshold=0.7))
    assert second == {"images": 0, "texts": 0}
    assert cache.hits == len(paths) and cache.misses == 0
    for a, b in zip(r1, r2):
        assert [f.probability for f in a.findings] == pytest.approx([f.probability for f in b.findings], abs=1e-6)
        assert (a.view, a.size, a.input_warnings) == (b.view, b.size, b.input_warnings)
        assert [f.positive for f in b.findings] == [f.probability >= 0.7 for f in b.findings]


def test_another_variant_set_reuses_the_shared_variants(backbone, image_dir):
    paths = sorted(image_dir.iterdir())
    ls = load_label_set("chestxray14")
    list(Scorer(backbone, ls, variants="original", num_workers=0, image_cache=ImageEmbeddingCache()).score(paths))
    b2, counts = counting(backbone)
    list(Scorer(b2, ls, variants="original", num_workers=0, image_cache=ImageEmbeddingCache()).score(paths))
    assert counts["images"] == 0
    list(Scorer(b2, ls, variants="original,hflip", num_workers=0, image_cache=ImageEmbeddingCache()).score(paths))
    assert counts["images"] == 2 * len(paths)  # hflip is new: the images are encoded (both variants, one pass)


def test_an_unreadable_store_file_is_set_aside_and_rebuilt(tmp_path, caplog):
    (tmp_path / "embeddings.sqlite").write_bytes(b"not a database at all" * 100)
    store = EmbeddingStore(tmp_path)
    store.put_texts("m", {"k": vec(0)})
    assert "k" in store.get_texts("m", ["k"])
    assert list(tmp_path.glob("embeddings.sqlite.corrupt-*"))
    assert "unreadable" in caplog.text


def test_cache_info_and_prune_commands(backbone, image_dir):
    paths = sorted(image_dir.iterdir())
    list(Scorer(backbone, load_label_set("chestxray14"), variants="original,hflip", num_workers=0,
                image_cache=ImageEmbeddingCache()).score(paths))
    runner = CliRunner()
    out = runner.invoke(main, ["cache", "info", "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert info["models"][backbone.fingerprint]["images"] == len(paths)
    assert info["models"][backbone.fingerprint]["texts"] > 0
    assert os.environ["VLM_XRAY_CACHE"] in info["path"]
    out = runner.invoke(main, ["cache", "info"])
    assert out.exit_code == 0 and f"model {backbone.fingerprint}: {len(paths)} images" in out.output
    out = runner.invoke(main, ["cache", "prune", "--max-size", "0"])
    assert out.exit_code == 0 and "removed" in out.output, out.output
    assert open_store().info()["models"] == {}
    out = runner.invoke(main, ["cache", "prune", "--max-size", "lots"])
    assert out.exit_code == 2 and "500MB" in out.output


def test_two_batches_at_once_share_the_store_safely(openclip_dir, image_dir, tmp_path):
    """Two `vlm-xray batch` processes on the same images and store: both complete, same findings."""
    env = {**os.environ, "VLM_XRAY_CACHE": str(tmp_path / "shared-cache")}
    cmd = [sys.executable, "-m", "vlm.cli", "batch", str(image_dir), "--model", str(openclip_dir),
           "--variants", "original,hflip", "--threshold", "0.5", "--out"]
    procs = [subprocess.Popen(cmd + [str(tmp_path / f"out{i}")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    rows = [list(csv.DictReader(open(tmp_path / f"out{i}" / "findings.csv"))) for i in (1, 2)]
    assert len(rows[0]) == 4 * 14
    for a, b in zip(*rows):
        assert a["image"] == b["image"] and a["label"] == b["label"]
        assert float(a["probability"]) == pytest.approx(float(b["probability"]), abs=1e-6)
    info = EmbeddingStore(tmp_path / "shared-cache").info()["models"]
    assert sum(m["images"] for m in info.values()) == 4
