"""`vlm-xray pretrain`: options -> `PretrainConfig` -> `vlm.pretrain.pretrain`.

Importing this module does not import torch (vlm.pretrain loads its training code lazily)."""
from __future__ import annotations

import shlex
import sys

import click

from ..pretrain import DEFAULT_IMAGE_TOWER, PretrainConfig
from .common import device_option, friendly_errors, seed_option

@click.command("pretrain", context_settings={"show_default": True})
@click.option("--data", "data", multiple=True, required=True, metavar="PATH[:LABELSET]",
              help="A labels.csv (or its folder) with filename/labels/patient columns; repeat for several. "
                   "The label set (prompts/<name>.yaml) is auto-detected from the CSV's labels unless given "
                   "after a colon, e.g. shared/data/chest4:chest4. A 'caption' or 'report' column, when present, "
                   "is used as the caption instead of prompt-generated text.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder (open_clip layout: open_clip_config.json, open_clip_model.safetensors, "
                   "metrics.json, README.md); load it with --model PATH.")
@click.option("--image-tower", default=DEFAULT_IMAGE_TOWER,
              help="timm model name for the image tower (random init). Must accept the chosen --image-size "
                   "(conv/hybrid nets such as edgenext_xx_small, mobilevit_xxs do; plain ViTs need 224).")
@click.option("--image-size", default=128, type=int, help="Training/inference resolution in pixels.")
@click.option("--embed-dim", default=384, type=int,
              help="Joint embedding size; 384 keeps MiniLM's sentence space exactly (identity projection).")
@click.option("--epochs", default=20, type=int)
@click.option("--batch-size", default=128, type=int)
@click.option("--lr", default=2e-3, type=float, help="Peak AdamW learning rate (warm-up then cosine).")
@device_option
@seed_option
@click.option("--resume/--no-resume", default=False,
              help="Continue from OUT/train_state.pt (same configuration required).")
@click.option("--text-lora/--no-text-lora", default=False,
              help="Adapt the MiniLM text tower with LoRA (r=8, query/value) instead of keeping it locked. "
                   "Slower; the saved weights then include the text transformer (~45 MB).")
@click.option("--withhold", "withhold", multiple=True, metavar="LABEL",
              help="Label never shown in captions (repeatable): its training rows are dropped; it stays in "
                   "validation to measure zero-shot transfer to an unseen label.")
@click.option("--val-fraction", default=0.15, type=float, help="Share of patients held out for validation.")
@click.option("--loss", default="multipos", type=click.Choice(["multipos", "siglip"]),
              help="multipos: label-aware multi-positive contrastive (rows sharing a label combination are "
                   "positives); siglip: pairwise sigmoid loss with the same positives.")
@click.option("--prompt-weight", default=1.0, type=float,
              help="Weight of the auxiliary prompt loss (the zero-shot scoring head itself); 0 disables it.")
@click.option("--max-minutes", default=None, type=float,
              help="Training-time budget: the cosine LR schedule follows max(step, elapsed-time) progress and "
                   "training stops when the budget is spent (best checkpoint kept); --epochs is then an upper bound.")
@click.option("--max-steps-per-epoch", default=None, type=int,
              help="Cap on optimiser steps per epoch (quick trials and equivalence checks; the LR schedule "
                   "follows the capped length).")
@click.option("--num-threads", default=None, type=int,
              help="CPU threads for torch (default: $OMP_NUM_THREADS or all cores).")
@click.option("--keep-train-state/--no-keep-train-state", default=False,
              help="Keep OUT/train_state.pt (optimizer etc.) after the run finishes, to extend it later.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Cache the resized images here (.npy) to start later runs faster.")
@click.option("--init-from", default=None, metavar="NAME|PATH",
              help="Start the image tower from this model's weights (same tower), e.g. fine-tune a 128 px "
                   "model at --image-size 160 (progressive resizing). Default: random initialisation.")
@click.option("--progress/--no-progress", default=True, help="Show tqdm progress bars.")
@friendly_errors
def pretrain_command(data, out_dir, image_tower, image_size, embed_dim, epochs, batch_size, lr, device, seed,
                     resume, text_lora, withhold, val_fraction, loss, prompt_weight, max_minutes, max_steps_per_epoch,
                     num_threads, keep_train_state, cache_dir, init_from, progress):
    """Pre-train a LiT-style CLIP: a small image tower trained against the locked
    all-MiniLM-L6-v2 text tower, on image/label CSVs whose labels become captions.

    \b
    Example:
      vlm-xray pretrain --data shared/data/nih14 --data shared/data/chest4 \\
          --data shared/data/skin --out my-model --epochs 20

    The result is a research demonstrator, not a diagnostic device.
    """
    from ..api import resolve_device
    from ..pretrain import pretrain

    config = PretrainConfig(
        data=list(data), out_dir=out_dir, image_tower=image_tower, image_size=image_size, embed_dim=embed_dim,
        epochs=epochs, batch_size=batch_size, lr=lr, device=resolve_device(device), seed=seed, resume=resume,
        withhold_labels=tuple(withhold), val_fraction=val_fraction, loss=loss, prompt_weight=prompt_weight,
        text_lora=text_lora, max_minutes=max_minutes, max_steps_per_epoch=max_steps_per_epoch,
        num_threads=num_threads, keep_train_state=keep_train_state, cache_dir=cache_dir, init_from=init_from,
        command=_command_line(), progress=progress)
    m = pretrain(config)
    m.pop("model", None)
    click.echo(f"wrote {out_dir} (best epoch {m['best_epoch']}, {m['seconds']['total'] / 60:.1f} min)")
    for s, v in (m.get("val") or {}).items():
        aucs = ", ".join(f"{k} {a:.3f}" for k, a in v["auc"].items())
        click.echo(f"  {s}: mean AUC {v['mean_auc']:.3f}  [{aucs}]")


def _command_line() -> str:
    """The pretrain command as typed, for the model card."""
    args = sys.argv[1:]
    if "pretrain" in args:  # `vlm-xray [global options] pretrain ...`
        args = args[args.index("pretrain") + 1:]
    return "vlm-xray pretrain " + " ".join(shlex.quote(a) for a in args)



@click.command("pretrain-stage2", context_settings={"show_default": True})
@click.option("--base", required=True, metavar="NAME|PATH",
              help="Stage-1 model (edgenext_xx_small tower, from `vlm-xray pretrain`) whose body is kept frozen; "
                   "its image projection is the starting point of the new one.")
@click.option("--data", "data", multiple=True, required=True, metavar="PATH[:LABELSET]",
              help="Labelled CSVs (or folders), exactly as given to the stage-1 run (same patient split).")
@click.option("--train-only-data", "train_only_data", multiple=True, metavar="PATH[:LABELSET]",
              help="Data used for training only, never validation (e.g. nih14-lowres); rows of validation "
                   "patients are dropped.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output model folder.")
@click.option("--withhold", "withhold", multiple=True, metavar="LABEL",
              help="Label whose training rows are dropped (repeatable); base it on a stage-1 model that withheld it.")
@click.option("--views", default=3, type=int, help="Cached body-map views per image (1 plain + augmented ones).")
@click.option("--image-size", default=None, type=int,
              help="Input size in px, a multiple of 32 (default: the base's). The frozen conv body then gives "
                   "size/32 x size/32 tokens: 192 px -> 6x6 instead of 4x4 at 128 px.")
@click.option("--epochs", default=40, type=int)
@click.option("--batch-size", default=256, type=int)
@click.option("--lr", default=1e-3, type=float, help="Peak AdamW learning rate (one-cycle).")
@click.option("--prompt-weight", default=0.0, type=float, help="Weight of the per-label prompt loss (0 = off).")
@click.option("--sampling", default="uniform", type=click.Choice(["uniform", "balanced"]),
              help="balanced: rows drawn with weight 1/sqrt(count of their label combination).")
@click.option("--lowres-prob", default=0.15, type=float,
              help="Share of augmented views downsampled to 64 px and back (resolution invariance).")
@seed_option
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Cache resized images and body maps here to start later runs in seconds.")
@click.option("--resume/--no-resume", default=False, help="Continue from OUT/stage2_state.pt.")
@friendly_errors
def pretrain_stage2_command(base, data, train_only_data, out_dir, withhold, views, image_size, epochs, batch_size, lr,
                            prompt_weight, sampling, lowres_prob, seed, cache_dir, resume):
    """Stage 2: add two transformer blocks (fused attn.qkv, full weight: what LoRA adapts) to a
    trained conv tower, freeze its body, and train the blocks on cached body feature maps.

    \b
    How the bundled v2 starter was made (see its model card):
      vlm-xray pretrain-stage2 --base STAGE1_MODEL --data ../shared/data/nih14 \\
          --data ../shared/data/chest4 --data ../shared/data/skin \\
          --train-only-data ../shared/data/nih14-lowres --out my-starter-v2 --cache-dir cache

    CPU only (the frozen body runs once per image and view). Not a diagnostic device.
    """
    from ..pretrain.stage2 import Stage2Config, stage2

    args = sys.argv[sys.argv.index("pretrain-stage2") + 1:] if "pretrain-stage2" in sys.argv else sys.argv[1:]
    config = Stage2Config(base=base, data=list(data), out_dir=out_dir, train_only_data=list(train_only_data),
                          withhold_labels=tuple(withhold), views=views, image_size=image_size, epochs=epochs,
                          batch_size=batch_size, lr=lr,
                          prompt_weight=prompt_weight, sampling=sampling, lowres_prob=lowres_prob, seed=seed,
                          cache_dir=cache_dir, resume=resume,
                          command="vlm-xray pretrain-stage2 " + " ".join(shlex.quote(a) for a in args))
    m = stage2(config)
    click.echo(f"wrote {out_dir} (best epoch {m['best_epoch']}, {m['seconds']['total'] / 60:.1f} min)")
    for s, v in m["val"].items():
        click.echo(f"  {s}: mean AUC {v['mean_auc']:.3f}")
