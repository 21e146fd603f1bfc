"""The library's front door: Python and the CLI give the same numbers; one threshold rule;
fast, torch-free start; one-line user errors; default output folders."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image as PILImage

from vlm import load_scorer
from vlm.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nih_00000001_000.png"


def _cli_json(*args) -> dict:
    r = CliRunner().invoke(main, ["analyze", *map(str, args), "--json", "-", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output[r.output.index("{"):])


def _probabilities(d: dict) -> np.ndarray:
    return np.array([f["probability"] for f in d["findings"]])


def test_readme_example_equals_cli_on_bundled_model():
    """The README's Python example and `vlm-xray analyze --json` agree, shipped calibration included."""
    scorer = load_scorer("vlm-xray-starter", labels="chestxray14", device="cpu")
    assert scorer.calibration is not None  # the bundled starter ships calibration-chestxray14.json
    py = next(scorer.score([EXAMPLE], threshold=0.4)).to_dict()
    cli = _cli_json(EXAMPLE, "--threshold", "0.4")
    np.testing.assert_allclose(_probabilities(py), _probabilities(cli), atol=1e-6)
    assert py["calibration"] == cli["calibration"] and [f["positive"] for f in py["findings"]] == \
        [f["positive"] for f in cli["findings"]]
    raw = next(load_scorer(calibration="none", device="cpu").score([EXAMPLE])).to_dict()
    assert not np.allclose(_probabilities(raw), _probabilities(py), atol=1e-3)  # calibration really applied


def _synthetic_csv(root: Path) -> Path:
    """Two classes of chest4 drawn as different generated images (patients p0.., p1..)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = ["filename,labels,patient"]
    for k, name in enumerate(["NORMAL", "PNEUMONIA"]):
        for i in range(3):
            img = rng.normal(80 + 90 * k, 20, (96, 96)).clip(0, 255).astype(np.uint8)
            PILImage.fromarray(img).save(root / f"{name}_{i}.png")
            rows.append(f"{name}_{i}.png,{name},p{k}{i}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


@pytest.mark.slow
def test_python_equals_cli_with_an_adapter_on_bundled_model(tmp_path):
    adapter = tmp_path / "adapter"
    r = CliRunner().invoke(main, ["finetune", "--model", "vlm-xray-starter", "--data", str(_synthetic_csv(tmp_path / "d")),
                                  "--labels", "chest4", "--shots", "2", "--max-steps", "2", "--out", str(adapter),
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    scorer = load_scorer("vlm-xray-starter", labels="chestxray14", adapter=adapter, device="cpu")
    assert scorer.label_set.name == "chest4" and scorer.calibration is None  # the adapter's own head and labels
    py = next(scorer.score([EXAMPLE])).to_dict()
    cli = _cli_json(EXAMPLE, "--adapter", adapter)
    assert py["adapter"] == cli["adapter"] == str(adapter)
    np.testing.assert_allclose(_probabilities(py), _probabilities(cli), atol=1e-6)


def test_one_threshold_rule(openclip_dir, tmp_path):
    from vlm.calibrate import Calibration

    scorer = load_scorer(str(openclip_dir), labels="chest4", variants="original", device="cpu")
    assert scorer.thresholds() == 0.5 and scorer.thresholds(0.3) == 0.3
    with pytest.raises(ValueError, match="threshold"):
        scorer.thresholds(1.5)
    names = scorer.label_set.names
    cal = Calibration(source="cal.json", label_set="chest4", label_names=names, mode="multiclass",
                      thresholds={n: 0.1 * (i + 1) for i, n in enumerate(names)},
                      model_fingerprint=scorer.backbone.fingerprint)
    calibrated = load_scorer(str(openclip_dir), labels="chest4", variants="original", device="cpu", calibration=cal)
    assert calibrated.thresholds() == cal.thresholds and calibrated.thresholds(0.7) == 0.7


def test_calibration_for_another_model_is_refused(openclip_dir):
    from vlm.calibrate import Calibration, CalibrationError

    ls_names = load_scorer(str(openclip_dir), labels="chest4", device="cpu").label_set.names
    cal = Calibration(source="other.json", label_set="chest4", label_names=ls_names, mode="multiclass",
                      thresholds={n: 0.5 for n in ls_names}, model_fingerprint="0123456789abcdef")
    with pytest.raises(CalibrationError, match="fingerprint"):
        load_scorer(str(openclip_dir), labels="chest4", device="cpu", calibration=cal)


@pytest.mark.parametrize("argv", [["--help"], ["labels"], ["analyze", "--help"], ["batch", "--help"]])
def test_help_and_labels_do_not_import_torch(argv):
    code = ("import sys\nfrom vlm.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().endswith("NO-TORCH"), r.stderr[-2000:]


def test_user_errors_exit_2_with_one_line(tmp_path):
    for argv in (["analyze", str(EXAMPLE), "--model", str(tmp_path / "nope")],
                 ["analyze", str(EXAMPLE), "--labels", "no-such-set"],
                 ["eval", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")]):
        r = CliRunner().invoke(main, argv)
        assert r.exit_code == 2, (argv, r.output)
        assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("error:"), r.output


def test_batch_and_eval_default_to_reports_folder(tmp_path, monkeypatch):
    from vlm.commands.common import default_out_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "nih14").mkdir()
    assert default_out_dir(["nih14"]) == Path("reports/nih14")
    assert default_out_dir(["nih14/labels.csv"], prefix="eval-") == Path("reports/eval-nih14")
    assert default_out_dir(["nih14/0000*.jpg", "x.png"]) == Path("reports/nih14-0000-.jpg+1")
    assert default_out_dir(["scan one.png"]) == Path("reports/scan-one")
