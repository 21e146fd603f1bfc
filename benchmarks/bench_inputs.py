"""Real-world inputs: a batch over the generated mixed corpus, and what reading each format costs.

    python benchmarks/bench_inputs.py [--model vlm-xray-starter] [--size 1024]

1. Writes the mixed corpus of tests/corpus.py (good rasters in odd modes, DICOMs made from the shared
   chest images - MONOCHROME1, 12/16-bit, windowed, VOI LUT, RLE/JPEG 2000/JPEG, no suffix, bare -
   hostile files and folder entries) to a temporary folder and runs `run_batch` over it with the
   model: counts of scored / listed / ignored entries, the exit code and the wall time.
2. Times `load_image` per format on one SIZE x SIZE chest image (median of 5 reads).

Writes benchmarks/inputs.md (and inputs.json) beside this script.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/corpus.py generates the inputs

from tests.corpus import (SHARED_CHEST, dicom_dataset, jpeg_dicom, make_corpus, quantise,  # noqa: E402
                          save_dicom, source_pixels)
from vlm.batch import run_batch  # noqa: E402
from vlm.images import load_image  # noqa: E402


def corpus_batch(model: str | None, variants: str | None) -> dict:
    from vlm.api import load_scorer

    scorer = load_scorer(model, labels="chestxray14", variants=variants, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        expected = make_corpus(Path(tmp) / "corpus")
        t0 = time.perf_counter()
        s = run_batch(scorer, [Path(tmp) / "corpus"], Path(tmp) / "out", progress=False)
        seconds = time.perf_counter() - t0
    return {"entries": len(expected), "scored": s.scored, "listed_in_errors_csv": len(s.failed),
            "not_images_counted": s.not_images, "duplicates": s.duplicates, "with_input_warnings": s.warned,
            "exit_code": s.exit_code, "seconds": round(seconds, 2), "variants": list(scorer.variants),
            "model": scorer.backbone.name, "expected_scored": sum(e.outcome == "scored" for e in expected.values()),
            "expected_listed": sum(e.outcome == "failed" for e in expected.values())}


def format_files(folder: Path, size: int) -> dict[str, Path]:
    import pydicom.uid

    grey = source_pixels(1, size)[0]
    files = {"PNG 8-bit": folder / "a.png", "PNG 16-bit": folder / "b.png", "JPEG": folder / "c.jpg"}
    PILImage.fromarray(quantise(grey, 8)).save(files["PNG 8-bit"])
    PILImage.fromarray(quantise(grey, 16)).save(files["PNG 16-bit"])
    PILImage.fromarray(quantise(grey, 8)).save(files["JPEG"], quality=90)
    dicoms = {"DICOM native 16-bit": dict(bits=16), "DICOM MONOCHROME1 12-bit": dict(bits=12, photometric="MONOCHROME1"),
              "DICOM RLE 16-bit": dict(bits=16, compress=pydicom.uid.RLELossless),
              "DICOM JPEG 2000 lossless 12-bit": dict(bits=12, compress=pydicom.uid.JPEG2000Lossless)}
    for i, (name, kw) in enumerate(dicoms.items()):
        ds = dicom_dataset(quantise(grey, kw["bits"]), bits_stored=kw["bits"],
                           photometric=kw.get("photometric", "MONOCHROME2"))
        files[name] = save_dicom(ds, folder / f"d{i}.dcm", compress=kw.get("compress"))
    files["DICOM JPEG baseline 8-bit"] = jpeg_dicom(grey, folder / "j.dcm")
    return files


def read_times(size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = {}
        for name, path in format_files(Path(tmp), size).items():
            load_image(path)  # warm-up (imports, decoder plugins)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                load_image(path)
                times.append(time.perf_counter() - t0)
            out[name] = round(statistics.median(times) * 1000, 1)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the bundled vlm-xray-starter")
    ap.add_argument("--variants", default=None, help="default: the model's default variants")
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    batch = corpus_batch(args.model, args.variants)
    reads = read_times(args.size)
    source = "shared nih14-lowres chest images" if SHARED_CHEST.is_dir() else "synthetic pixels"
    result = {"batch": batch, "read_ms": reads, "size": args.size, "pixels_from": source,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
                         f"{os.getloadavg()[0]:.1f} (a shared machine: times are noisy), python {platform.python_version()}"}
    (HERE / "inputs.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Real-world inputs", "", f"`python benchmarks/bench_inputs.py` ({result['machine']}; pixels from "
             f"{source}).", "", "## Batch over the generated mixed corpus", "",
             "| entries | scored | listed in errors.csv | non-images counted | duplicates | with input warnings "
             "| exit code | seconds | model | variants |", "|" + "---|" * 10,
             f"| {batch['entries']} | {batch['scored']} (expected {batch['expected_scored']}) | "
             f"{batch['listed_in_errors_csv']} (expected {batch['expected_listed']}) | {batch['not_images_counted']} | "
             f"{batch['duplicates']} | {batch['with_input_warnings']} | {batch['exit_code']} | {batch['seconds']} | "
             f"{batch['model']} | {','.join(batch['variants'])} |", "",
             f"## load_image per format ({args.size} x {args.size}, median of 5, ms)", "",
             "| format | ms |", "|---|---|", *[f"| {k} | {v} |" for k, v in reads.items()], ""]
    (HERE / "inputs.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
