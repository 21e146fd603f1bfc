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
                           "per-label thresholds (used unless --threshold is given).")(fn)
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
    if calibration:
        from .calibrate import load_calibration

        scorer.calibration = load_calibration(calibration, ls)
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
@click.option("--threshold", "-t", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Probability at or above which a finding is called positive.")
@click.option("--json", "json_out", default=None, metavar="PATH|-",
              help="Write results as JSON (one object per image, a list for several); '-' for stdout.")
@friendly_errors
def analyze(images, model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration, threshold,
            json_out):
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
    scorer = build_scorer(model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration)
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
    if failures:
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


if __name__ == "__main__":  # pragma: no cover
    main()
