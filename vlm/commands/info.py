"""`vlm-xray labels`, `prompts show|validate`, `variants`, `models list|show`: what exists."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import friendly_errors


@click.command("labels")
def labels_cmd():
    """List the available label sets (built-in and from $VLM_XRAY_PROMPTS)."""
    from ..labels import LabelSetError, list_label_sets, load_label_set

    for name, path in list_label_sets().items():
        try:
            ls = load_label_set(path)
            click.echo(f"{name:<14} {ls.mode:<10} {len(ls.labels):>3} labels  styles: {', '.join(ls.prompt_styles)}"
                       f"  ({ls.display_name})")
        except LabelSetError as e:
            click.echo(f"{name:<14} INVALID: {e}")


@click.group()
def prompts():
    """Inspect, check and compare prompt sets."""


@prompts.command("show")
@click.argument("label_set")
@click.option("--prompt-style", "prompt_styles", multiple=True, help="Only these styles.")
@friendly_errors
def prompts_show(label_set, prompt_styles):
    """Show the labels and prompts of LABEL_SET (a name or a YAML path)."""
    from ..labels import load_label_set

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
    """Check prompt/label-set YAML FILES; prints OK or the file, key and problem (exit 2 if any is bad)."""
    from ..labels import LabelSetError, load_label_set

    bad = 0
    for f in files:
        try:
            ls = load_label_set(Path(f))
            click.echo(f"OK  {f}: {ls.name}, {len(ls.labels)} labels, styles {', '.join(ls.prompt_styles)}")
        except LabelSetError as e:
            bad += 1
            click.echo(f"BAD {e}", err=True)
    sys.exit(2 if bad else 0)


@click.command("variants")
def variants_cmd():
    """List the preprocessing variants (* = used by default)."""
    from ..variants import DEFAULT_VARIANTS, list_variants

    for name, doc in list_variants().items():
        click.echo(f"{'*' if name in DEFAULT_VARIANTS else ' '} {name:<12} {doc}")


@click.group()
def models():
    """List and describe models."""


@models.command("list")
def models_list():
    """Show the model registry and what is available offline."""
    from ..models import DEFAULT_MODEL, list_models

    for m in list_models():
        star = "*" if m["name"] == DEFAULT_MODEL else " "
        click.echo(f"{star} {m['name']:<24} {m['status']:<10} {m['description']}")
    click.echo("\n* default. Any open_clip folder, HF CLIP folder, .pt or .safetensors path also works as --model.")


@models.command("show")
@click.argument("name")
@friendly_errors
def models_show(name):
    """Print the model card of NAME (registry name or path)."""
    from ..models import load_model

    b = load_model(name)
    n_params = sum(p.numel() for p in b.module.parameters())
    click.echo(f"{b.name}: {b.layout} from {b.source}\n{n_params / 1e6:.1f}M parameters, image size {b.image_size}, "
               f"fingerprint {b.fingerprint}")
    if b.calibrations:
        click.echo(f"ships calibrations for: {', '.join(b.calibrations)} (applied by default)")
    click.echo("")
    click.echo(b.card or "(this checkpoint ships no model card)")
