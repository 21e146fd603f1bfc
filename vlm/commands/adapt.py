"""`vlm-xray finetune` and `vlm-xray fewshot-study`: few-shot adapters and studies of them."""
from __future__ import annotations

from pathlib import Path

import click

from ..adapt import METHODS
from .common import (device_option, friendly_errors, invocation, labels_option, mapping_option, model_option,
                     prompt_style_option, seed_option, variants_option)


def _parse_shots(text: str) -> int | None:
    if str(text).lower() == "all":
        return None
    try:
        k = int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: a number of shots per class or 'all'") from None
    if k < 1:
        raise click.BadParameter("shots must be >= 1 (or 'all')")
    return k


def _load_data(path, ls, mapping):
    from ..data import load_labelled_csv, load_mapping

    return load_labelled_csv(path, ls, load_mapping(mapping))


def _same_file(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def lora_options(fn):
    opts = [
        click.option("--epochs", default=40, show_default=True, type=click.IntRange(1), help="LoRA: epochs over the shots (cosine schedule)."),
        click.option("--lr", default=1e-3, show_default=True, type=float, help="LoRA: AdamW learning rate of the LoRA weights."),
        click.option("--head-lr", default=1e-2, show_default=True, type=float, help="LoRA: AdamW learning rate of the prompt-initialised head."),
        click.option("--rank", default=8, show_default=True, type=click.IntRange(1), help="LoRA rank r."),
        click.option("--alpha", "lora_alpha", default=16.0, show_default=True, type=float, help="LoRA alpha (scaling alpha/r)."),
        click.option("--dropout", default=0.1, show_default=True, type=click.FloatRange(0, 1), help="LoRA dropout."),
        click.option("--lora-text", is_flag=True, help="LoRA: also adapt the text tower's attention projections."),
        click.option("--no-augment", is_flag=True, help="LoRA: train without the light augmentation."),
        click.option("--patience", default=8, show_default=True, type=click.IntRange(1), help="LoRA: early-stopping patience in validation rounds (one per ~8 steps, at most one per epoch)."),
        click.option("--layer-scale", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="LoRA: also train the layer-scale gammas gating the targeted attention branches (auto: when "
                          "a LoRA update of the targets barely moves the output, e.g. EdgeNeXt's gamma_xca)."),
        click.option("--train-batch-size", default=16, show_default=True, type=click.IntRange(1), help="LoRA: images per optimiser step."),
        click.option("--anchor", default=0.0, show_default=True, type=click.FloatRange(0),
                     help="LoRA: penalty weight keeping the head near the zero-shot prompt embeddings (CLAP-style; "
                          "relative squared distance). 0 = off."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _settings(epochs, lr, head_lr, rank, lora_alpha, dropout, lora_text, no_augment, patience, layer_scale,
              train_batch_size, anchor=0.0, seed=0, max_steps=None):
    from ..adapt.lora import LoraSettings

    return LoraSettings(rank=rank, alpha=lora_alpha, dropout=dropout, lr=lr, head_lr=head_lr, epochs=epochs,
                        batch_size=train_batch_size, lora_text=lora_text, augment=not no_augment, patience=patience,
                        seed=seed, max_steps=max_steps, layer_scale=layer_scale, anchor=anchor)


@click.command("finetune")
@click.option("--data", "data_csv", required=True, type=click.Path(), metavar="CSV",
              help="Labelled CSV (filename,labels[,patient]) to draw the shots from.")
@labels_option
@model_option
@click.option("--method", type=click.Choice(METHODS), default="lora", show_default=True,
              help="lora: PEFT LoRA on the attention projections + prompt-initialised head; linear-probe / "
                   "tip-adapter: frozen-feature baselines.")
@click.option("--shots", default="16", show_default=True, metavar="K|all", help="Shots per class (seeded); 'all' = every row.")
@click.option("--out", "out_dir", required=True, type=click.Path(), metavar="DIR", help="Adapter folder to write.")
@click.option("--val-data", default=None, type=click.Path(), metavar="CSV",
              help="Validation CSV: LoRA early stopping (epoch 0 = zero-shot competes), baseline hyper-parameters and "
                   "the per-label never-worse guard; training patients are left out. Default: 8 images per class "
                   "from the other patients of --data (source-matched), so the guard always runs.")
@click.option("--val-shots", default=None, metavar="K|all",
              help="Validation images per class (same-source negatives added). Default: all rows of --val-data, "
                   "8 per class when drawn from --data.")
@click.option("--eval-data", default=None, type=click.Path(), metavar="CSV",
              help="Evaluate adapter vs zero-shot on this CSV (training patients left out) into the model card.")
@click.option("--max-eval", default=0, type=click.IntRange(0),
              help="Cap the --eval-data images (stratified, seeded) to save time; 0 = all.")
@mapping_option
@prompt_style_option
@seed_option
@device_option
@click.option("--max-steps", default=None, type=click.IntRange(0), help="Stop after this many optimiser steps (0: untrained adapter = zero-shot).")
@lora_options
@friendly_errors
def finetune_cmd(data_csv, label_set, model, method, shots, out_dir, val_data, val_shots, eval_data, max_eval, mapping,
                 prompt_styles, seed, device, max_steps, **lora_kw):
    """Few-shot adapt a model to a label set and write an adapter folder for --adapter.

    Example: vlm-xray finetune --data labels.csv --labels chest4 --shots 16 --out adapters/chest4-16shot
    """
    from ..api import resolve_device
    from ..data import sample_shots
    from ..labels import load_label_set
    from ..models import load_model
    from ..scoring import ImageEmbeddingCache
    from ..adapt.core import exclude_groups, finetune, validation_set

    k = _parse_shots(shots)
    ls = load_label_set(label_set)
    backbone = load_model(model, device=resolve_device(device))
    data = _load_data(data_csv, ls, mapping)
    train = data.subset(sample_shots(data, k, seed))
    given = _load_data(val_data, ls, mapping) if val_data else None
    val = validation_set(data, train, given, _parse_shots(val_shots) if val_shots else None, seed)
    ev = _load_data(eval_data, ls, mapping) if eval_data else None
    if ev is not None and val is not None:
        ev = exclude_groups(ev, val)
    if ev is not None and max_eval:
        from ..adapt.study import _stratified_cap

        ev = _stratified_cap(exclude_groups(ev, train), max_eval, seed)
    settings = _settings(**lora_kw, seed=seed, max_steps=max_steps)
    cmd = invocation()
    finetune(backbone, ls, data, method=method, shots=k, seed=seed, styles=list(prompt_styles) or None, val=val,
             eval_data=ev, settings=settings, out_dir=out_dir, cache=ImageEmbeddingCache(), progress=True,
             training_meta={"command": cmd, "val_data": val_data, "eval_data": eval_data, "method": method})



@click.command("fewshot-study")
@click.option("--data", "data_csv", required=True, type=click.Path(), metavar="CSV", help="Labelled CSV the shots come from.")
@click.option("--eval-data", default=None, type=click.Path(), metavar="CSV",
              help="Held-out CSV. Omitted or the same file as --data: a patient-grouped split of --data.")
@labels_option
@model_option
@click.option("--shots", "shots", multiple=True, metavar="K", help="Shot counts, e.g. --shots 1 4 16 (or 1,4,16).")
@click.argument("more_shots", nargs=-1, type=int)
@click.option("--method", "methods", multiple=True, type=click.Choice(METHODS), help="Repeatable; default: all of them.")
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(1), help="Repeats (shot samples) per point.")
@click.option("--out", "out_dir", required=True, type=click.Path(), metavar="DIR")
@click.option("--eval-fraction", default=0.3, show_default=True, type=click.FloatRange(0.05, 0.9),
              help="Share of patients held out when --eval-data is --data.")
@click.option("--holdout", type=click.Choice(["split", "pretrain-val"]), default="split", show_default=True,
              help="split: --eval-data, or a patient-grouped split of --data; pretrain-val: the rows the base model "
                   "held out when `vlm-xray pretrain` trained it (needs its metrics.json), so zero-shot is not "
                   "measured on images it was trained on.")
@click.option("--max-eval", default=0, type=click.IntRange(0), help="Cap the held-out set (stratified, seeded); 0 = all.")
@variants_option(default="original", help_default="original")
@click.option("--val-shots", default=8, show_default=True, type=click.IntRange(1),
              help="Validation images per class drawn from the training pool (disjoint from the shots) for early "
                   "stopping / hyper-parameters; max(K, this) per run.")
@mapping_option
@prompt_style_option
@device_option
@lora_options
@friendly_errors
def fewshot_study_cmd(data_csv, eval_data, label_set, model, shots, more_shots, methods, seeds, out_dir, eval_fraction,
                      holdout, max_eval, variants, val_shots, mapping, prompt_styles, device, **lora_kw):
    """Macro AUC vs shots per method (zero-shot = 0 shots): CSV + markdown table and an HTML plot.

    Example: vlm-xray fewshot-study --data labels.csv --labels chest4 --shots 1 4 16 --method lora
    --method tip-adapter --seeds 3 --out study/
    """
    from ..api import resolve_device
    from ..labels import load_label_set
    from ..models import load_model
    from ..variants import resolve_variants
    from ..adapt.study import run_study

    ks = [int(s) for t in shots for s in str(t).split(",") if s.strip()] + list(more_shots)
    ks = sorted(set(ks or [1, 4, 16]))
    if any(k < 1 for k in ks):
        raise ValueError("--shots values must be >= 1")
    ls = load_label_set(label_set)
    backbone = load_model(model, device=resolve_device(device))
    data = _load_data(data_csv, ls, mapping)
    ev = None if (eval_data is None or _same_file(eval_data, data_csv)) else _load_data(eval_data, ls, mapping)
    cmd = invocation()
    run_study(backbone, ls, data, ev, shots=ks, methods=list(methods) or list(METHODS), seeds=seeds,
              out_dir=out_dir, eval_fraction=eval_fraction, max_eval=max_eval or None,
              variants=resolve_variants(variants), val_shots=val_shots,
              settings=_settings(**lora_kw), styles=list(prompt_styles) or None, command=cmd,
              holdout=holdout)
