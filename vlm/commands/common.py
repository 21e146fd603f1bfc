"""What every command shares: user errors (exit 2, one line), shared options, logging set-up,
default output folders. Nothing here imports torch; commands import the library lazily."""
from __future__ import annotations

import functools
import logging
import re
import shlex
import sys
from pathlib import Path

import click

logger = logging.getLogger("vlm")

REPORTS_DIR = Path("reports")  # default output root of `batch` and `eval` (git-ignored)


class UserError(click.ClickException):
    """A usage or configuration error: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def friendly_errors(fn):
    """Turn the library's expected errors into one clear line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..images import ImageLoadError
        from ..labels import LabelSetError
        from ..models import ModelLoadError

        try:
            return fn(*args, **kwargs)
        except (ModelLoadError, LabelSetError, ImageLoadError, FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from e

    return wrapper


def setup_logging(verbose: int, quiet: bool) -> None:
    """Progress and status messages (INFO) by default; -v adds debug detail with the logger's name;
    --quiet leaves errors only. Messages go to stderr, results to stdout."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s" if verbose else "%(message)s"))
    root = logging.getLogger("vlm")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def invocation() -> str:
    """The command line as typed (for model and adapter cards)."""
    return shlex.join(["vlm-xray", *sys.argv[1:]])


def _options(*decorators):
    def apply(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


# ----------------------------------------------------------------------------- shared options
# The same option means the same thing in every command: they are declared once, here.
model_option = click.option(
    "--model", "-m", default=None, metavar="NAME|PATH",
    help="Model: a registry name (see `vlm-xray models list`), hf-hub:org/repo, an open_clip or Hugging Face "
         "CLIP folder, an OpenAI/CheXzero .pt, or a .safetensors file. Default: vlm-xray-starter (bundled, offline).")
labels_option = click.option(
    "--labels", "-l", "label_set", default="chestxray14", show_default=True, metavar="NAME|YAML",
    help="Label set (see `vlm-xray labels`) or a path to your own YAML.")
prompt_style_option = click.option(
    "--prompt-style", "prompt_styles", multiple=True, metavar="STYLE",
    help="Prompt style(s) to ensemble (repeatable). Default: all styles of the label set.")
device_option = click.option(
    "--device", default="auto", show_default=True,
    help="cpu, cuda, cuda:1 ... auto picks cuda when available (bf16 autocast on GPU).")
seed_option = click.option("--seed", default=0, show_default=True, type=int,
                           help="Seed of every random choice the command makes (splits, shots, init, bootstrap).")
mapping_option = click.option("--mapping", default=None, type=click.Path(), metavar="YAML",
                              help="Rename dataset label names to label-set names ('dataset name: label name').")


def variants_option(default=None, help_default="the default variants (marked * in `vlm-xray variants`)"):
    return click.option("--variants", default=default, metavar="A,B,...",
                        help=f"Comma-separated preprocessing variants averaged per image. Default: {help_default}.")


def threshold_option(what="a finding is called positive"):
    return click.option(
        "--threshold", "-t", default=None, type=click.FloatRange(0, 1),
        help=f"Probability at or above which {what}. Default: the per-label thresholds of the calibration "
             f"in use (see --calibration), else 0.5.")


def _window(ctx, param, value):
    if value is None:
        return None
    from ..images import parse_window

    try:
        return parse_window(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


# How inputs are read (vlm.images.LoadOptions); see docs/inputs.md.
input_options = _options(
    click.option("--window", default=None, metavar="C,W", callback=_window,
                 help="DICOM: window centre,width (e.g. 40,400) instead of the file's first VOI window."),
    click.option("--max-pixels", default=64_000_000, show_default=True, type=click.IntRange(1),
                 help="Refuse images with more pixels than this before decoding them (decompression bombs)."),
    click.option("--include-phi", is_flag=True,
                 help="Keep identifying DICOM header values in outputs (off: only view, laterality, body part)."),
    click.option("--multiframe", default="first", show_default=True, type=click.Choice(["first", "refuse"]),
                 help="Multi-frame DICOM/animated files: score the first frame (with a warning) or refuse them."),
)

heatmap_method_option = click.option(
    "--heatmap-method", default=None, metavar="NAME",
    help="Force a heatmap method (gradcam, gradcam++, hirescam, rollout, patch-text; default: chosen by the tower).")

heatmap_options = _options(
    click.option("--heatmaps", is_flag=True,
                 help="Add heatmaps of the positive findings (regions that raised each score) to the reports/JSON."),
    heatmap_method_option,
)

ood_option = click.option(
    "--ood", default="warn", show_default=True, type=click.Choice(["warn", "reject", "off"]),
    help="Out-of-distribution guard: warn (a visible warning in the table, report and JSON), reject (the image "
         "is listed as failed, with the reason), off.")

scorer_options = _options(
    model_option, labels_option, prompt_style_option, variants_option(), device_option,
    click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1),
                 help="Images per encoder batch (each image contributes one tensor per variant)."),
    click.option("--adapter", default=None, metavar="DIR", type=click.Path(),
                 help="Few-shot adapter folder from `vlm-xray finetune` (must match --model)."),
    click.option("--calibration", default="auto", show_default=True, metavar="auto|none|JSON",
                 help="auto: the model's own calibration-LABELSET.json when its folder ships one (not with "
                      "--adapter); none: raw prompt probabilities; or a file from `vlm-xray calibrate` "
                      "(calibrated probabilities and per-label thresholds)."),
)

data_options = _options(
    click.option("--data", "data_csv", required=True, type=click.Path(), metavar="CSV",
                 help="Labelled CSV: filename,labels[,patient,source,split,...] (labels pipe-separated)."),
    mapping_option,
    click.option("--split", default=None, metavar="NAME", help="Only rows whose split column equals NAME."),
    click.option("--where", multiple=True, metavar="COL=VALUE[,VALUE]",
                 help="Only rows whose column COL has one of the values (repeatable; all must hold)."),
    click.option("--group-split", default=None, metavar="FRACTION:SIDE",
                 help="One side (train|val) of the seeded patient split, e.g. 0.5:train / 0.5:val."),
    seed_option,
)


def load_options_from(window=None, max_pixels=64_000_000, include_phi=False, multiframe="first"):
    from ..images import LoadOptions

    return LoadOptions(window=window, max_pixels=max_pixels, include_phi=include_phi, multiframe=multiframe)


def scorer_from_options(model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration,
                        image_cache=None, load_options=None, ood="off"):
    """The one place a command turns its shared options into a scorer (through the library's front door)."""
    from ..api import load_scorer

    return load_scorer(model, label_set, adapter=adapter, calibration=calibration, variants=variants,
                       prompt_styles=list(prompt_styles), device=device, batch_size=batch_size,
                       image_cache=image_cache, load_options=load_options, ood=ood)


def image_cache():
    from ..scoring import ImageEmbeddingCache

    return ImageEmbeddingCache()  # $VLM_XRAY_CACHE/images: re-runs and other prompts cost no image encoding


# ----------------------------------------------------------------------------- default output folders

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "input"


def input_name(inputs) -> str:
    """A folder name for what a command was pointed at: `nih14` for ../shared/data/nih14 or its
    labels.csv, `nih14-0000` for a glob ../shared/data/nih14/0000*.jpg; `+N` when there are more."""
    first = Path(str(inputs[0]))
    if first.name == "labels.csv":
        name = first.parent.resolve().name
    elif any(c in first.name for c in "*?["):
        name = f"{first.parent.resolve().name}-{first.name}"
    elif first.is_dir():
        name = first.resolve().name
    else:
        name = first.stem
    name = _slug(name or "input")
    return name + (f"+{len(inputs) - 1}" if len(inputs) > 1 else "")


def default_out_dir(inputs, prefix: str = "") -> Path:
    """reports/<name of the input>/ so that re-running the same command resumes into the same folder."""
    return REPORTS_DIR / (prefix + input_name(list(inputs)))
