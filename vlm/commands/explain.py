"""`vlm-xray explain`: heatmaps of chosen findings on images (regions that raised each score)."""
from __future__ import annotations

import click

from .common import (UserError, device_option, friendly_errors, heatmap_method_option, labels_option, model_option,
                     prompt_style_option, scorer_from_options)


@click.command("explain")
@click.argument("images", nargs=-1, required=True)
@click.option("--label", "labels", multiple=True, metavar="LABEL",
              help="Finding to explain (repeatable). Default: every label of the label set.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Writes DIR/<image id>.<label>.<method>.png overlays (and .npy maps with --npy).")
@heatmap_method_option
@click.option("--npy", is_flag=True, help="Also save each float map (the model's input crop, values 0-1) as .npy.")
@click.option("--alpha", default=0.45, show_default=True, type=click.FloatRange(0, 1), help="Overlay opacity.")
@model_option
@labels_option
@prompt_style_option
@device_option
@click.option("--adapter", default=None, metavar="DIR", type=click.Path(), help="Few-shot adapter folder.")
@friendly_errors
def explain_cmd(images, labels, out_dir, heatmap_method, npy, alpha, model, label_set, prompt_styles, device, adapter):
    """Heatmaps of findings on IMAGES: where the image raised each finding's prompt-ensemble score.

    Saliency is not localisation: a map shows what moved the score, not where a lesion is.
    """
    from ..explain import explain, save_heatmaps
    from ..images import find_images, load_image

    paths = find_images(list(images))
    if not paths:
        raise UserError(f"no images found in: {' '.join(images)}")
    scorer = scorer_from_options(model, label_set, prompt_styles, "original", device, 1, adapter, "none")
    unknown = [lab for lab in labels if lab not in scorer.label_set.names]
    if unknown:
        raise UserError(f"--label {', '.join(unknown)}: not in label set {scorer.label_set.name} "
                        f"({', '.join(scorer.label_set.names)})")
    for path in paths:
        image = load_image(path)
        maps = save_heatmaps(explain(scorer, scorer.label_set, image, list(labels) or None, method=heatmap_method),
                             image.pixels, out_dir, image.id, npy=npy, alpha=alpha)
        for hm in maps:
            note = " (empty: nothing raised this score)" if hm.empty else ""
            click.echo(f"{path}: {hm.label} [{hm.method}] peak at x={hm.peak[0]}, y={hm.peak[1]}, "
                       f"score {hm.score:.3f}{note} -> {hm.files['png']}")
