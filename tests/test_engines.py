"""Batch engines (vlm.engines): the streaming pipeline equals the plain per-image computation, streams
in order, writes through one background writer; the Ray engine writes the same findings.csv as the
local one, also when a model replica is killed mid-batch."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import vlm.scoring as scoring
from vlm.batch import run_batch
from vlm.engines import BackgroundWriter, get_engine
from vlm.images import load_image
from vlm.labels import load_label_set
from vlm.models import load_model
from vlm.results import ImageFailure
from vlm.scoring import ImageEmbeddingCache, Scorer
from vlm.transforms import variant_tensors

VARIANTS = ["original", "clahe", "hflip"]


@pytest.fixture(scope="module")
def backbone(openclip_dir):
    return load_model(str(openclip_dir))


@pytest.fixture
def mixed_inputs(image_dir, corrupt_file):
    paths = sorted(image_dir.iterdir())
    return paths[:2] + [corrupt_file] + paths[2:]


def reference_probabilities(scorer, path):
    """The computation without any engine: one image, one variant at a time, per-variant forward passes."""
    image = load_image(path, scorer.load_options)
    b = scorer.backbone
    with torch.no_grad():
        emb = torch.cat([b.encode_images(variant_tensors(image, [v], b.image_size, b.mean, b.std))
                         for v in scorer.variants])
        return scorer.probabilities(emb).numpy(), image


@pytest.mark.parametrize("workers,batch,cached", [(0, 1, False), (2, 3, False), (1, 2, True)])
def test_streaming_pipeline_equals_the_per_image_computation(backbone, mixed_inputs, workers, batch, cached):
    ls = load_label_set("chestxray14")
    cache = ImageEmbeddingCache() if cached else None
    runs = 2 if cached else 1  # the second run reads every embedding back from the store
    for _ in range(runs):
        scorer = Scorer(backbone, ls, variants=VARIANTS, num_workers=workers, batch_size=batch, image_cache=cache)
        out = list(scorer.score(mixed_inputs, threshold=0.5))
        assert [str(o.image) for o in out] == [str(p) for p in mixed_inputs]  # input order, failures in place
        assert isinstance(out[2], ImageFailure) and "not a recognised image" in out[2].reason
        for path, res in zip(mixed_inputs, out):
            if isinstance(res, ImageFailure):
                continue
            probs, image = reference_probabilities(scorer, path)
            mean = probs.reshape(-1, probs.shape[-1]).mean(0)
            np.testing.assert_allclose([f.probability for f in res.findings], mean, atol=1e-5)
            assert res.size == image.size and res.view == image.view
            assert res.input_warnings == image.warnings
    if cached:
        assert cache.misses == 4 and cache.hits == 4


def test_pipeline_streams_instead_of_preparing_everything_first(backbone, image_dir, monkeypatch):
    paths = sorted(image_dir.iterdir()) * 6  # 24 inputs
    prepared = []
    real = scoring.prepare_image

    def counting(path, *args):
        prepared.append(path)
        return real(path, *args)

    monkeypatch.setattr(scoring, "prepare_image", counting)
    scorer = Scorer(backbone, load_label_set("chestxray14"), variants="original", num_workers=0, batch_size=4)
    stream = scorer.score(paths)
    first = next(stream)
    assert str(first.image) == str(paths[0])
    # the batches of the encoder streams (one, or two plus one queued), not the whole list
    assert len(prepared) in (4, 12)
    assert len(list(stream)) == len(paths) - 1


def test_background_writer_writes_everything_in_order_and_raises_its_error():
    written = []

    def slow_write(item):
        time.sleep(0.002)
        written.append((item, threading.current_thread().name))

    with BackgroundWriter(slow_write, max_pending=4) as w:
        for i in range(50):
            w.submit(i)
    assert [i for i, _ in written] == list(range(50))
    assert {name for _, name in written} == {"vlm-writer"}  # not the producer's thread

    def failing(item):
        if item == 3:
            raise OSError("disk full")

    w = BackgroundWriter(failing, max_pending=2)
    with pytest.raises(OSError, match="disk full"):
        for i in range(100):
            w.submit(i)
            time.sleep(0.001)
        w.close()


def test_batch_through_the_local_engine_equals_the_per_image_computation(backbone, mixed_inputs, tmp_path):
    import csv

    scorer = Scorer(backbone, load_label_set("chestxray14"), variants=VARIANTS, batch_size=2,
                    image_cache=ImageEmbeddingCache())
    summary = run_batch(scorer, mixed_inputs, tmp_path / "out", threshold=0.5, progress=False, chunk_size=2,
                        engine=get_engine("local", num_workers=1))
    assert summary.scored == 4 and len(summary.failed) == 1
    rows = list(csv.DictReader(open(tmp_path / "out" / "findings.csv", newline="")))
    by_image = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(float(r["probability"]))
    for path in mixed_inputs:
        if str(path) in by_image:
            probs, _ = reference_probabilities(scorer, path)
            np.testing.assert_allclose(by_image[str(path)], probs.reshape(-1, probs.shape[-1]).mean(0), atol=1e-5)


# ----------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_local():
    if os.environ.get("VLM_XRAY_REQUIRE_RAY"):  # .ci/run installs the [ray] extra: never skipped there
        import ray
    else:
        ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


class _KillOnce:
    """Builds an encoder replica class that kills its own process (os._exit, as SIGKILL would) the first
    time it is handed a batch; the marker file makes it happen once across restarts."""

    @staticmethod
    def make(marker):
        from vlm.engines.ray_data import _Encoder

        class KillingEncoder(_Encoder):
            def __call__(self, batch):
                import os
                from pathlib import Path

                if not Path(marker).exists():
                    Path(marker).write_text(str(os.getpid()))
                    os._exit(1)
                return super().__call__(batch)

        return KillingEncoder


@pytest.mark.slow
def test_ray_engine_writes_the_same_findings_as_the_local_engine(ray_local, backbone, mixed_inputs, tmp_path,
                                                                 monkeypatch):
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ls = load_label_set("chestxray14")

    def batch(engine, out):
        scorer = Scorer(backbone, ls, variants=VARIANTS, batch_size=2, image_cache=ImageEmbeddingCache())
        return run_batch(scorer, mixed_inputs, tmp_path / out, threshold=0.5, progress=False, engine=engine)

    local = batch(get_engine("local", num_workers=0), "local")
    ray_run = batch(get_engine("ray", num_workers=1), "ray")
    assert (ray_run.scored, len(ray_run.failed)) == (local.scored, len(local.failed)) == (4, 1)
    expected = (tmp_path / "local" / "findings.csv").read_bytes()
    assert (tmp_path / "ray" / "findings.csv").read_bytes() == expected
    assert (tmp_path / "ray" / "errors.csv").read_bytes() == (tmp_path / "local" / "errors.csv").read_bytes()

    # a replica dies mid-batch: Ray restarts it and re-runs the batch; no row is lost or doubled
    from vlm.engines.ray_data import RayEngine

    marker = tmp_path / "killed.pid"
    engine = RayEngine(num_workers=1)
    engine.encoder_class = _KillOnce.make(str(marker))
    monkeypatch.setenv("VLM_XRAY_CACHE", str(tmp_path / "fresh-cache"))  # nothing stored: every image encoded
    killed = batch(engine, "ray-killed")
    assert marker.exists()  # the replica really died
    assert killed.scored == 4
    assert (tmp_path / "ray-killed" / "findings.csv").read_bytes() == expected


# ----------------------------------------------------------------------------- OOD guard in the main pass

def _counting_copy(backbone, counter):
    """A copy of `backbone` whose image encoder counts its forward passes."""
    copy = type(backbone)(**{**backbone.__dict__})
    orig = type(backbone).encode_images

    def counting(pixels):
        counter.append(pixels.shape[0])
        return orig(copy, pixels)

    copy.encode_images = counting
    return copy


def test_ood_verdict_from_the_main_pass_equals_the_separate_check(image_dir, monkeypatch):
    """With the guard on, the stage features come from the batch's one forward pass (and from the
    store on a re-run): no second decode + forward per image, and the same verdict as check_image."""
    from vlm import ood

    base = load_model("vlm-xray-starter")
    ls = load_label_set("chestxray14")
    guard = ood.OODGuard.for_model(base, ls)
    assert guard.feature_stats is not None  # the bundled model's guard uses stage features
    paths = sorted(image_dir.iterdir())
    expected = [guard.check_image(load_image(p)).to_dict() for p in paths]
    monkeypatch.setattr(ood.OODGuard, "check_image", lambda *a: pytest.fail("second decode + forward"))
    cache = ImageEmbeddingCache()
    for run in range(2):  # the second run reads embeddings and stage features back from the store
        calls = []
        scorer = Scorer(_counting_copy(base, calls), ls, variants=["clahe", "original"], batch_size=2,
                        num_workers=0, image_cache=cache, ood_guard=guard, ood_mode="warn")
        out = list(scorer.score(paths, threshold=0.5))
        assert calls == ([4, 4] if run == 0 else [])  # 2 batches x 2 images x 2 variants; then none
        for res, exp in zip(out, expected):
            got = res.ood
            assert got["available"] and got["in_distribution"] == exp["in_distribution"]
            assert got["score"] == pytest.approx(exp["score"], rel=1e-4)
            assert got["details"]["feature_score"] == pytest.approx(exp["details"]["feature_score"], rel=1e-4)
            assert got["details"]["signals"] == ["embedding", "stage-features"]
            assert got["reason"].split("(")[0] == exp["reason"].split("(")[0]


def test_ood_guard_without_the_original_variant_still_checks_the_image(image_dir):
    """'original' not among the variants: the guard reads and encodes the image itself (check_image)."""
    from vlm import ood

    base = load_model("vlm-xray-starter")
    ls = load_label_set("chestxray14")
    guard = ood.OODGuard.for_model(base, ls)
    path = sorted(image_dir.iterdir())[0]
    scorer = Scorer(base, ls, variants=["clahe"], num_workers=0, ood_guard=guard, ood_mode="warn")
    res = next(scorer.score([path]))
    exp = guard.check_image(load_image(path)).to_dict()
    assert res.ood["score"] == pytest.approx(exp["score"], rel=1e-4)
    assert res.ood["details"]["signals"] == ["embedding", "stage-features"]


@pytest.mark.slow
def test_ray_engine_takes_the_ood_stage_features_from_its_replicas(ray_local, image_dir, monkeypatch):
    """With the guard on, Ray replicas return the stage features of the same forward pass: the verdicts
    equal the local engine's, with no second decode + forward in the driver, and they reach the store."""
    from vlm import ood

    base = load_model("vlm-xray-starter")
    ls = load_label_set("chestxray14")
    guard = ood.OODGuard.for_model(base, ls)
    paths = sorted(image_dir.iterdir())

    def verdicts(engine, cache):
        scorer = Scorer(base, ls, variants=["original", "hflip"], batch_size=2, num_workers=0, image_cache=cache,
                        ood_guard=guard, ood_mode="warn")
        return [r.ood for r in engine.results(scorer, paths, 0.5)]

    local = verdicts(get_engine("local", num_workers=0), None)
    monkeypatch.setattr(ood.OODGuard, "check_image", lambda *a: pytest.fail("second decode + forward"))
    cache = ImageEmbeddingCache()
    for _ in range(2):  # then from the store: every image a hit, stage features included
        got = verdicts(get_engine("ray", num_workers=1), cache)
        for g, e in zip(got, local):
            assert g["in_distribution"] == e["in_distribution"]
            assert g["details"]["feature_score"] == pytest.approx(e["details"]["feature_score"], rel=1e-4)
    assert cache.hits == len(paths)


def test_encoder_plan_runs_two_streams_on_a_cpu_and_spares_spinning_cores(monkeypatch):
    """On a CPU the encoder runs two forward passes at once, each on half the threads; one stream on a GPU,
    a single CPU, a compiled encoder or a single batch. With spinning OpenMP threads the loop keeps to the cores the
    decode workers leave (more threads than free cores spin at every barrier)."""
    cpu, before = torch.device("cpu"), torch.get_num_threads()
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(scoring, "available_cpus", lambda: 2)
    assert scoring.encoder_plan(cpu, 1) == (2, max(1, before // 2))
    assert scoring.encoder_plan(cpu, 1, compiled=True) == (1, None)
    assert scoring.encoder_plan(cpu, 0, batches=1) == (1, None)  # one image (analyze): as the API runs it
    assert scoring.encoder_plan(torch.device("cuda"), 1) == (1, None)
    monkeypatch.setattr(scoring, "available_cpus", lambda: 1)
    assert scoring.encoder_plan(cpu, 0) == (1, None)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setattr(scoring, "available_cpus", lambda: 2)
    assert scoring.encoder_plan(cpu, 1) == (2, 1)
    monkeypatch.setattr(scoring, "available_cpus", lambda: 64)
    assert scoring.encoder_plan(cpu, 8) == (2, max(1, min(before, 56) // 2))  # never more than torch would use


@pytest.mark.parametrize("features", [False, True])
def test_two_encoder_streams_give_the_one_stream_results_in_order(backbone, mixed_inputs, monkeypatch, features):
    """Two passes at once (threads) change neither the numbers nor the order, and the OOD stage features
    each pass pools are its own batch's; torch's thread setting is restored afterwards."""
    from vlm.scoring import encode_images

    before, seen = torch.get_num_threads(), []
    real = scoring._forward

    def spy(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "_forward", spy)
    runs = {}
    for cpus in (1, 2):
        monkeypatch.setattr(scoring, "available_cpus", lambda: cpus)
        seen.clear()
        runs[cpus] = list(encode_images(backbone, mixed_inputs, VARIANTS, batch_size=2, num_workers=1,
                                        features=features))
        assert torch.get_num_threads() == before
        assert all(name.startswith("vlm-encoder") == (cpus == 2) for name, _ in seen) and len(seen) == 3
    assert all(t == max(1, before // 2) for _, t in seen)
    for one, two in zip(runs[1], runs[2], strict=True):
        assert type(one) is type(two)
        if isinstance(one, ImageFailure):
            assert one.image == two.image and one.reason == two.reason
            continue
        assert one.path == two.path
        assert torch.allclose(one.embeddings, two.embeddings, atol=1e-6)
        if features:
            assert np.allclose(one.features, two.features, atol=1e-5)


def _square_or_fail(x):
    if x == 7:
        raise OSError("disk full")
    return x * x


def _square_and_pid(x):
    return x * x, os.getpid()


def test_process_writer_runs_in_a_child_in_order_and_raises_its_error():
    from vlm.engines import ProcessWriter

    got = []
    with ProcessWriter(_square_and_pid, lambda item, value: got.append((item, value)),
                       max_pending=3) as w:
        for i in range(20):
            w.submit(i, i)
        w.submit("no work")  # no args: only through done, in its turn
    assert [item for item, _ in got] == [*range(20), "no work"]
    assert [v[0] for _, v in got[:20]] == [i * i for i in range(20)] and got[-1][1] is None
    assert {v[1] for _, v in got[:20]} != {os.getpid()}  # rendered in another process

    with pytest.raises(OSError, match="disk full"):
        with ProcessWriter(_square_or_fail, lambda item, value: None, max_pending=2) as w:
            for i in range(30):
                w.submit(i, i)
    assert not w._child.is_alive()  # stopped after its error, not left running
    with pytest.raises(OSError, match="disk full"):  # raised at close when it comes last
        with ProcessWriter(_square_or_fail, lambda item, value: None) as w:
            w.submit(7, 7)


def _echo_big(data: bytes) -> bytes:
    return data[::-1] * 2


def test_process_writer_moves_big_tasks_and_results_without_deadlock():
    """Tasks and results bigger than a pipe's buffer, many in flight: neither side may wait on the other."""
    from vlm.engines import ProcessWriter

    got = []
    with ProcessWriter(_echo_big, lambda item, value: got.append((item, value)), max_pending=32) as w:
        for i in range(40):
            w.submit(i, bytes([i]) * 150_000)
    assert [i for i, _ in got] == list(range(40))
    assert all(v == bytes([i]) * 300_000 for i, v in got)


def test_process_writer_names_a_child_that_died():
    import signal

    from vlm.engines import ProcessWriter

    w = ProcessWriter(time.sleep, lambda item, value: None)
    w.submit(0, 0.01)
    w._wait()
    os.kill(w.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="report writer process stopped unexpectedly"):
        with w:
            for i in range(5):
                w.submit(i, 0.01)


KILLED_PARENT = """
import os, sys, time
from vlm.engines import ProcessWriter
w = ProcessWriter(time.sleep, lambda item, value: None)
w.submit(0, 0.01)
w._wait()
print(w.pid, flush=True)
time.sleep(60)
"""


def test_process_writer_child_exits_when_the_batch_is_killed(tmp_path):
    import signal
    import subprocess

    parent = subprocess.Popen([sys.executable, "-c", KILLED_PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the writer's child outlived the killed batch process")


def test_the_cpu_stage_starts_without_torch():
    # Ray's read tasks and the DataLoader's workers run vlm.prepare: each process of a cluster would
    # otherwise import torch (~2 s of CPU) before reading its first image
    code = ("import sys, vlm.prepare, vlm.engines.ray_data; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_ray_address_that_does_not_answer_is_one_clear_error(monkeypatch):
    ray = pytest.importorskip("ray")
    from vlm.engines.ray_data import _init_ray

    def no_cluster(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(ValueError, match=r"--ray-address auto: no Ray cluster answered.*ray start --head"):
        _init_ray("auto", None)
