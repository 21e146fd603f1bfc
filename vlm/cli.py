"""`vlm-xray` command line: parses options, calls the library, sets exit codes.

Exit codes: 0 success; 1 some inputs failed (the rest were processed); 2 usage or
configuration error (unknown model, label set, bad file) reported in one line.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .labels import LabelSetError, list_label_sets, load_label_set
from .variants import DEFAULT_VARIANTS, list_variants


class UserError(click.ClickException):
    exit_code = 2


def friendly_errors(fn):
    """Turn the library's expected errors into one clear line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .images import ImageLoadError
        from .models import ModelLoadError

        try:
            return fn(*args, **kwargs)
        except (ModelLoadError, LabelSetError, ImageLoadError, FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from e

    return wrapper


# Shared options: the same words mean the same thing in every command.
def model_options(fn):
    fn = click.option("--model", "-m", default=None, metavar="NAME|PATH",
                      help="Model: a registry name (see `vlm-xray models list`), hf-hub:org/repo, an open_clip or "
                           "Hugging Face CLIP folder, an OpenAI/CheXzero .pt, or a .safetensors file. "
                           "Default: vlm-xray-starter (bundled, offline).")(fn)
    fn = click.option("--labels", "-l", "label_set", default="chestxray14", show_default=True, metavar="NAME|YAML",
                      help="Label set (see `vlm-xray labels`) or a path to your own YAML.")(fn)
    fn = click.option("--prompt-style", "prompt_styles", multiple=True, metavar="STYLE",
                      help="Prompt style(s) to ensemble (repeatable). Default: all styles of the label set.")(fn)
    fn = click.option("--variants", default=",".join(DEFAULT_VARIANTS), show_default=True,
                      help="Comma-separated preprocessing variants averaged per image (see `vlm-xray variants`).")(fn)
    fn = click.option("--device", default="auto", show_default=True,
                      help="cpu, cuda, cuda:1 ... auto picks cuda when available (bf16/fp16 autocast on GPU).")(fn)
    fn = click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1),
                      help="Images per encoder batch (each image contributes one tensor per variant).")(fn)
    fn = click.option("--adapter", default=None, metavar="DIR", type=click.Path(),
                      help="Few-shot adapter folder from `vlm-xray finetune` (must match --model).")(fn)
    fn = click.option("--calibration", default=None, metavar="JSON", type=click.Path(),
                      help="Calibration file from `vlm-xray calibrate`: calibrated probabilities and "
                           "per-label thresholds (used unless --threshold is given). Default: the model's own "
                           "calibration-LABELSET.json if its folder ships one; 'none' for raw probabilities.")(fn)
    return fn


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def build_scorer(model, label_set, prompt_styles, variants, device, batch_size, adapter=None, calibration=None,
                 image_cache=None):
    """The one place a command turns its options into a `Scorer` (model + adapter + calibration)."""
    from .models import load_model
    from .scoring import Scorer

    ls = load_label_set(label_set)
    backbone = load_model(model, device=resolve_device(device))
    head = adapter_name = None
    if adapter:
        from .adapt import load_adapter

        backbone, head, ls = load_adapter(adapter, backbone, ls)
        adapter_name = str(adapter)
    scorer = Scorer(backbone, ls, list(prompt_styles) or None, variants, batch_size=batch_size, head=head,
                    image_cache=image_cache)
    scorer.adapter_name = adapter_name
    if calibration is None and adapter is None:
        # A model folder may ship calibrations fitted on data it was trained with (the bundled
        # starter does): used by default so its probabilities mean something; --calibration none
        # gives the raw prompt-softmax probabilities.
        shipped = Path(backbone.source) / f"calibration-{ls.name}.json"
        calibration = str(shipped) if shipped.is_file() else None
    if calibration and calibration != "none":
        from .calibrate import load_calibration

        scorer.calibration = load_calibration(calibration, ls)
        scorer.calibration.check_compatible(scorer)  # refuses another model's calibration
    return scorer


def format_table(result) -> str:
    lines = [f"{result.image}  (model {result.model}, labels {result.label_set}, "
             f"{len(result.variants)} variants x {len(result.prompt_styles)} prompt styles)"]
    width = max(len(f.display or f.label) for f in result.findings)
    lines.append(f"  {'finding':<{width}}  {'prob':>6}  {'+/-':>6}  {'thr':>5}  call")
    for f in sorted(result.findings, key=lambda f: -f.probability):
        call = "POSITIVE" if f.positive else "-"
        lines.append(f"  {(f.display or f.label):<{width}}  {f.probability:6.3f}  {f.uncertainty:6.3f}  "
                     f"{f.threshold:5.2f}  {call}")
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="vlm-xray")
def main():
    """vlm-xray: zero-/few-shot reading of medical images with CLIP-style models.

    Research software, NOT a diagnostic device. Start with:

        vlm-xray analyze examples/nih_00000001_000.png --threshold 0.4
    """


@main.command()
@click.argument("images", nargs=-1, required=True)
@model_options
@click.option("--threshold", "-t", default=None, type=click.FloatRange(0, 1),
              help="Probability at or above which a finding is called positive. Default: the per-label "
                   "thresholds of --calibration, else 0.5.")
@click.option("--json", "json_out", default=None, metavar="PATH|-",
              help="Write results as JSON (one object per image, a list for several); '-' for stdout.")
@click.option("--html", "html_out", default=None, metavar="PATH",
              help="Write a structured HTML report (offline charts). Several images: PATH is a folder "
                   "(or use `vlm-xray batch`).")
@click.option("--markdown", "md_out", default=None, metavar="PATH",
              help="Write the report as Markdown. Several images: PATH is a folder.")
@click.option("--clinical", default=None, metavar="TEXT", help="Clinical information shown in the report.")
@friendly_errors
def analyze(images, model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration, threshold,
            json_out, html_out=None, md_out=None, clinical=None):
    """Score IMAGES (files, folders or globs; PNG, JPEG, 8/16-bit, RGB(A), DICOM).

    Prints, per image, each finding's probability (mean over preprocessing variants x prompt
    styles), its uncertainty (standard deviation over the same), and whether it reaches
    --threshold. Unreadable files are reported on stderr and the others still scored.
    """
    from .images import find_images
    from .results import ImageFailure, to_json

    paths = find_images(list(images))
    if not paths:
        raise UserError(f"no images found in: {' '.join(images)}")
    for opt, target in (("--html", html_out), ("--markdown", md_out)):
        if target and len(paths) > 1 and (Path(target).suffix or Path(target).is_file()):
            raise UserError(f"{opt} {target}: with several images {opt} takes a folder; "
                            "or use `vlm-xray batch IMAGES --out DIR` for reports with an index")
    scorer = build_scorer(model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration)
    if threshold is None and scorer.calibration is None:
        threshold = 0.5
    results, failures = [], []
    for out in scorer.score(paths, threshold, progress=len(paths) > 8):
        if isinstance(out, ImageFailure):
            failures.append(out)
            click.echo(f"error: {out.image}: {out.reason}", err=True)
        else:
            results.append(out)
            if json_out != "-":
                click.echo(format_table(out))
    if json_out:
        payload = [r.to_dict() for r in results]
        text = to_json(payload[0] if len(paths) == 1 and payload else payload)
        if json_out == "-":
            click.echo(text)
        else:
            Path(json_out).write_text(text + "\n", encoding="utf-8")
            click.echo(f"wrote {json_out}", err=True)
    if (html_out or md_out) and results:
        from .report import write_reports

        for written in write_reports(results, scorer.backbone, html_out, md_out, clinical, single=len(paths) == 1):
            click.echo(f"wrote {written}", err=True)
    if failures:
        sys.exit(1)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@model_options
@click.option("--out", "-o", "out_dir", required=True, metavar="DIR", type=click.Path(file_okay=False),
              help="Output folder: index.html, reports/, findings.csv/json, errors.csv.")
@click.option("--threshold", "-t", default=None, type=click.FloatRange(0, 1),
              help="Probability at or above which a finding is called positive. Default: the per-label "
                   "thresholds of --calibration, else 0.5.")
@click.option("--clinical", default=None, metavar="TEXT", help="Clinical information shown in every report.")
@click.option("--chunk-size", default=32, show_default=True, type=click.IntRange(1),
              help="Images scored per chunk; reports are written after each chunk.")
@friendly_errors
def batch(inputs, model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration, out_dir,
          threshold, clinical, chunk_size):
    """Score INPUTS (files, folders, globs, or a .csv list with a `filename` column relative to it)
    and write a report per image plus a sortable index to --out DIR.

    Re-running the same command resumes: images already reported with the same model, labels,
    variants, styles and threshold are not scored again. Exit code 1 if some inputs failed
    (listed in DIR/errors.csv).
    """
    from .batch import collect_inputs, run_batch

    if not collect_inputs(inputs):
        raise UserError(f"no images found in: {' '.join(inputs)}")
    scorer = build_scorer(model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration)
    try:
        summary = run_batch(scorer, inputs, out_dir, threshold, clinical=clinical, chunk_size=chunk_size)
    except KeyboardInterrupt:
        click.echo("interrupted; finished reports are kept - run the same command again to resume", err=True)
        sys.exit(130)
    click.echo(str(summary))
    for f in summary.failed:
        click.echo(f"error: {f.image}: {f.reason}", err=True)
    if summary.failed:
        sys.exit(1)


@main.command("labels")
def labels_cmd():
    """List the available label sets (built-in and from $VLM_XRAY_PROMPTS)."""
    for name, path in list_label_sets().items():
        try:
            ls = load_label_set(path)
            click.echo(f"{name:<14} {ls.mode:<10} {len(ls.labels):>3} labels  styles: {', '.join(ls.prompt_styles)}"
                       f"  ({ls.display_name})")
        except LabelSetError as e:
            click.echo(f"{name:<14} INVALID: {e}")


@main.group()
def prompts():
    """Inspect and check prompt sets."""


@prompts.command("show")
@click.argument("label_set")
@click.option("--prompt-style", "prompt_styles", multiple=True, help="Only these styles.")
@friendly_errors
def prompts_show(label_set, prompt_styles):
    """Show the labels and prompts of LABEL_SET (a name or a YAML path)."""
    ls = load_label_set(label_set)
    styles = ls.styles(list(prompt_styles) or None)
    click.echo(f"{ls.name}: {ls.display_name} ({ls.mode}; {ls.source})")
    for lab in ls.labels:
        click.echo(f"\n{lab.name}  [{lab.category}, severity {lab.severity}]  {lab.description}")
        for s in styles:
            click.echo(f"  {s}: + " + " | ".join(lab.prompts[s].positive))
            if ls.multilabel:
                click.echo(f"  {s}: - " + " | ".join(lab.prompts[s].negative))
    if ls.groups:
        click.echo("\ngroups: " + "; ".join(f"{g} = {', '.join(m)}" for g, m in ls.groups.items()))


@prompts.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path())
def prompts_validate(files):
    """Check prompt/label-set YAML FILES; prints OK or the file, key and problem."""
    bad = 0
    for f in files:
        try:
            ls = load_label_set(Path(f))
            click.echo(f"OK  {f}: {ls.name}, {len(ls.labels)} labels, styles {', '.join(ls.prompt_styles)}")
        except LabelSetError as e:
            bad += 1
            click.echo(f"BAD {e}", err=True)
    sys.exit(2 if bad else 0)


@main.command("variants")
def variants_cmd():
    """List the preprocessing variants."""
    for name, doc in list_variants().items():
        click.echo(f"{name:<12} {doc}")


@main.group()
def models():
    """List and describe models."""


@models.command("list")
def models_list():
    """Show the model registry and what is available offline."""
    from .models import DEFAULT_MODEL, list_models

    for m in list_models():
        star = "*" if m["name"] == DEFAULT_MODEL else " "
        click.echo(f"{star} {m['name']:<24} {m['status']:<10} {m['description']}")
    click.echo("\n* default. Any open_clip folder, HF CLIP folder, .pt or .safetensors path also works as --model.")


@models.command("show")
@click.argument("name")
@friendly_errors
def models_show(name):
    """Print the model card of NAME (registry name or path)."""
    from .models import load_model

    b = load_model(name)
    n_params = sum(p.numel() for p in b.module.parameters())
    click.echo(f"{b.name}: {b.layout} from {b.source}\n{n_params / 1e6:.1f}M parameters, image size {b.image_size}, "
               f"fingerprint {b.fingerprint}\n")
    click.echo(b.card or "(this checkpoint ships no model card)")


# ----------------------------------------------------------------------------- eval / calibrate / prompts compare
def data_options(fn):
    """Labelled data and which rows of it to use (eval, calibrate, prompts compare)."""
    fn = click.option("--data", "data_csv", required=True, type=click.Path(), metavar="CSV",
                      help="Labelled CSV: filename,labels[,patient,source,split,...] (labels pipe-separated).")(fn)
    fn = click.option("--mapping", default=None, type=click.Path(), metavar="YAML",
                      help="Rename dataset label names to label-set names ('dataset name: label name').")(fn)
    fn = click.option("--split", default=None, metavar="NAME", help="Only rows whose split column equals NAME.")(fn)
    fn = click.option("--where", multiple=True, metavar="COL=VALUE[,VALUE]",
                      help="Only rows whose column COL has one of the values (repeatable; all must hold).")(fn)
    fn = click.option("--group-split", default=None, metavar="FRACTION:SIDE",
                      help="One side (train|val) of a patient-grouped split, e.g. 0.5:train / 0.5:val.")(fn)
    fn = click.option("--seed", default=0, show_default=True, type=int,
                      help="Seed of --group-split and of the bootstrap.")(fn)
    return fn


def _image_cache():
    from .scoring import ImageEmbeddingCache

    return ImageEmbeddingCache()  # $VLM_XRAY_CACHE/images: re-runs and other prompts cost no image encoding


@main.command("eval")
@model_options
@data_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Writes DIR/metrics.json, DIR/predictions.csv and DIR/index.html.")
@click.option("--threshold", "-t", default=None, type=click.FloatRange(0, 1),
              help="Threshold for sensitivity/specificity/F1. Default: --calibration's per-label thresholds, else 0.5.")
@click.option("--bootstrap", "n_boot", default=1000, show_default=True, type=click.IntRange(0),
              help="Bootstrap resamples for the AUC 95% CIs (patients are resampled when the CSV has them).")
@friendly_errors
def eval_cmd(model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration, data_csv, mapping,
             split, where, group_split, seed, out_dir, threshold, n_boot):
    """Evaluate on labelled data: per-label ROC AUC with 95% CI, mean AUC, sensitivity/specificity/
    precision/F1 at the threshold(s), ECE; accuracy, macro-F1 and confusion matrix for multi-class sets."""
    from .evaluate import run_eval, select_data

    scorer = build_scorer(model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration,
                          image_cache=_image_cache())
    data, desc = select_data(data_csv, scorer.label_set, mapping, split, where, group_split, seed)
    click.echo(f"evaluating {len(data)} images of {data_csv} ({desc}) with {scorer.backbone.name}", err=True)
    m = run_eval(scorer, data, out_dir, threshold, n_boot=n_boot, seed=seed, progress=True,
                 log=lambda s: click.echo(s, err=True), extra={"subset": desc})
    width = max(len(n) for n in m["per_label"])
    for name, e in m["per_label"].items():
        ci = f"[{e['auc_ci'][0]:.3f}, {e['auc_ci'][1]:.3f}]" if e["auc_ci"] else ""
        auc = "  n/a" if e["auc"] is None else f"{e['auc']:.3f}"
        click.echo(f"  {name:<{width}}  AUC {auc} {ci:<16} n+ {e['n_pos']:>4}  ECE {e['ece']:.3f}")
    mc = m.get("multiclass")
    extra = f", accuracy {mc['accuracy']:.3f}, macro-F1 {mc['macro_f1']:.3f}" if mc else ""
    mean = "n/a" if m["mean_auc"] is None else f"{m['mean_auc']:.4f}"
    click.echo(f"mean AUC {mean}, mean ECE {m['mean_ece']:.4f}{extra}  -> {Path(out_dir) / 'index.html'}")
    if m["failed"]:
        sys.exit(1)


@main.command("calibrate")
@model_options
@data_options
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), metavar="JSON",
              help="Calibration file to write (use it with --calibration).")
@click.option("--target-sensitivity", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="Choose each label's threshold as the highest one reaching this sensitivity (default: Youden's J).")
@friendly_errors
def calibrate_cmd(model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration, data_csv,
                  mapping, split, where, group_split, seed, out_file, target_sensitivity):
    """Fit per-label probability calibration and operating thresholds on labelled data."""
    from .calibrate import fit_calibration, summary_lines, write_calibration
    from .evaluate import select_data

    if calibration:
        raise UserError("calibrate fits a new calibration; do not pass --calibration")
    # "none": fit on the raw prompt logits, never on top of a calibration the model folder ships
    scorer = build_scorer(model, label_set, prompt_styles, variants, device, batch_size, adapter, "none",
                          image_cache=_image_cache())
    data, desc = select_data(data_csv, scorer.label_set, mapping, split, where, group_split, seed)
    payload = fit_calibration(scorer, data, "target_sensitivity" if target_sensitivity else "youden",
                              target_sensitivity, progress=True, log=lambda s: click.echo(s, err=True),
                              data_description=desc)
    write_calibration(payload, out_file)
    click.echo("\n".join(summary_lines(payload)))
    click.echo(f"wrote {out_file}", err=True)


@prompts.command("compare")
@model_options
@data_options
@click.option("--prompt-file", "prompt_files", multiple=True, type=click.Path(), metavar="YAML",
              help="Prompt file (label-set YAML with prompts for some/all labels of --labels); repeatable.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), metavar="DIR",
              help="Also write DIR/index.html and DIR/compare.json.")
@click.option("--write-best", default=None, type=click.Path(dir_okay=False), metavar="YAML",
              help="Write the per-label best style as a new prompt file (a complete label set).")
@friendly_errors
def prompts_compare(model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration, data_csv,
                    mapping, split, where, group_split, seed, prompt_files, out_dir, write_best):
    """Rank prompt styles, prompt files and variant sets on labelled data (AUC, ECE per label and overall).

    Images are encoded once (and cached on disk); every extra style costs only text encoding."""
    from .labels import load_label_set
    from .models import load_model
    from .prompt_experiments import best_prompt_yaml, compare_prompts, format_table, write_compare_outputs
    from .evaluate import select_data

    if adapter or calibration:
        raise UserError("prompts compare ranks zero-shot prompts; --adapter/--calibration do not apply")
    ls = load_label_set(label_set)
    backbone = load_model(model, device=resolve_device(device))
    data, desc = select_data(data_csv, ls, mapping, split, where, group_split, seed)
    click.echo(f"comparing prompts on {len(data)} images of {data_csv} ({desc}) with {backbone.name}", err=True)
    res = compare_prompts(backbone, ls, data, list(prompt_styles), list(prompt_files), variants,
                          image_cache=_image_cache(), batch_size=batch_size, progress=True,
                          log=lambda s: click.echo(s, err=True))
    click.echo(format_table(res))
    if out_dir:
        write_compare_outputs(res, out_dir)
        click.echo(f"wrote {Path(out_dir) / 'index.html'}", err=True)
    if write_best:
        from .html import atomic_write_text

        atomic_write_text(write_best, best_prompt_yaml(ls, res))
        click.echo(f"wrote {write_best} (check with: vlm-xray prompts validate {write_best})", err=True)


# Few-shot adaptation commands live in vlm/adapt/commands.py (heavy imports happen inside them).
from .adapt.commands import fewshot_study_cmd, finetune_cmd  # noqa: E402

from .pretrain_cli import pretrain_command  # noqa: E402

main.add_command(finetune_cmd)
main.add_command(fewshot_study_cmd)
main.add_command(pretrain_command)


if __name__ == "__main__":  # pragma: no cover
    main()
