"""No DICOM header value other than view / laterality / body part reaches any output: reports, JSON,
CSV, the index, logs, warnings, error messages or file names - unless include_phi.

Identifiers are planted in every standard text element (~1,600), a private block and a nested
sequence of generated DICOM files, including files that fail to decode, then every byte the batch
wrote and everything it logged is searched for them."""
import logging
import re

import pytest
from click.testing import CliRunner

from tests.corpus import PHI_MARKERS, dicom_dataset, quantise, save_planted, source_pixels
from vlm.batch import run_batch
from vlm.images import ImageLoadError, LoadOptions, load_image
from vlm.labels import load_label_set
from vlm.models import load_model
from vlm.scoring import Scorer

MARKER = re.compile("|".join(map(re.escape, PHI_MARKERS)), re.IGNORECASE)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Four planted files: a good PA chest, a lateral with identifying text in its body-part field,
    one with truncated pixel data and one with an undecodable transfer syntax."""
    from pydicom.encaps import encapsulate

    root = tmp_path_factory.mktemp("planted")
    px = source_pixels(4)
    save_planted(dicom_dataset(quantise(px[0], 12), bits_stored=12, laterality="R"), root / "study1.dcm")
    lateral = dicom_dataset(quantise(px[1], 16), view="LL", body_part="ZQX BODY TEXT")
    save_planted(lateral, root / "study2.dcm")
    short = dicom_dataset(quantise(px[2], 16))
    short.PixelData = short.PixelData[:500]
    save_planted(short, root / "study3.dcm")
    video = dicom_dataset(quantise(px[3], 8), bits_allocated=8)
    video.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"
    video.PixelData = encapsulate([bytes(64)])
    video["PixelData"].VR, video["PixelData"].is_undefined_length = "OB", True
    save_planted(video, root / "IM0004")
    assert MARKER.search((root / "study1.dcm").read_bytes().decode("latin-1"))  # the plant worked
    return root


@pytest.fixture(scope="module")
def scorer_for(openclip_dir):
    backbone = load_model(str(openclip_dir))

    def make(**load):
        return Scorer(backbone, load_label_set("chestxray14"), variants="original", num_workers=0, batch_size=4,
                      load_options=LoadOptions(**load))
    return make


class _Everything(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


def leaks_in(out_dir) -> list[str]:
    found = []
    for p in out_dir.rglob("*"):
        if MARKER.search(p.name):
            found.append(f"file name {p}")
        if p.is_file():
            hit = MARKER.search(p.read_bytes().decode("utf-8", "replace"))
            if hit:
                found.append(f"{p.relative_to(out_dir)}: ...{hit.group(0)}...")
    return found


def test_no_header_value_reaches_any_output(planted, scorer_for, tmp_path, capfd):
    handler = _Everything()
    loggers = [logging.getLogger(), logging.getLogger("vlm"), logging.getLogger("pydicom")]
    old_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        summary = run_batch(scorer_for(), [planted], tmp_path / "out", threshold=0.5, progress=True)
    finally:
        for lg, level in zip(loggers, old_levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    captured = capfd.readouterr()
    assert summary.scored == 2 and len(summary.failed) == 2 and summary.exit_code == 1
    assert leaks_in(tmp_path / "out") == []
    for text in (captured.out, captured.err, "\n".join(handler.lines), str(summary),
                 *(f.reason for f in summary.failed)):
        assert not MARKER.search(text), MARKER.search(text)
    # the allowed fields do reach the outputs, checked against the planted defined terms
    first, second = summary.results
    assert (first.view, first.extra["laterality"], first.extra["body_part"]) == ("PA", "R", "CHEST")
    assert second.view == "LL" and "body_part" not in second.extra
    assert any("lateral view" in w for w in second.input_warnings)
    assert any("body part is not a defined term" in w for w in second.input_warnings)
    reasons = {f.image.rsplit("/", 1)[-1]: f.reason for f in summary.failed}
    assert "could not be decoded" in reasons["study3.dcm"] and "MPEG-4" in reasons["IM0004"]


def test_include_phi_lets_identifiers_through(planted, scorer_for, tmp_path):
    """The control: the same batch with include_phi shows the header, so the search above can fail."""
    summary = run_batch(scorer_for(include_phi=True), [planted / "study1.dcm"], tmp_path / "phi", 0.5,
                        progress=False)
    assert summary.results[0].extra["dicom_header"]["PatientID"].startswith("ZQX")
    assert leaks_in(tmp_path / "phi")
    with pytest.raises(ImageLoadError) as e:
        load_image(planted / "study3.dcm", include_phi=True)
    assert "could not be decoded" in e.value.reason


def test_cli_batch_output_has_no_identifiers(planted, openclip_dir, tmp_path):
    from vlm.cli import main

    r = CliRunner().invoke(main, ["batch", str(planted), "--model", str(openclip_dir), "--out", str(tmp_path / "c"),
                                  "--variants", "original", "--threshold", "0.5"])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and not MARKER.search(r.output)
    assert leaks_in(tmp_path / "c") == []
