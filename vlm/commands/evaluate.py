"""`vlm-xray eval`, `vlm-xray calibrate` and `vlm-xray prompts compare`: measure on labelled data."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .common import (UserError, data_options, default_out_dir, friendly_errors, image_cache, scorer_from_options,
                     scorer_options, threshold_option)

logger = logging.getLogger(__name__)


def _print_eval(m: dict, out_dir: Path) -> None:
    width = max(len(n) for n in m["per_label"])
    for name, e in m["per_label"].items():
        ci = f"[{e['auc_ci'][0]:.3f}, {e['auc_ci'][1]:.3f}]" if e["auc_ci"] else ""
        auc = "  n/a" if e["auc"] is None else f"{e['auc']:.3f}"
        click.echo(f"  {name:<{width}}  AUC {auc} {ci:<16} n+ {e['n_pos']:>4}  ECE {e['ece']:.3f}")
    mc = m.get("multiclass")
    extra = f", accuracy {mc['accuracy']:.3f}, macro-F1 {mc['macro_f1']:.3f}" if mc else ""
    mean = "n/a" if m["mean_auc"] is None else f"{m['mean_auc']:.4f}"
    click.echo(f"mean AUC {mean}, mean ECE {m['mean_ece']:.4f}{extra}  -> {out_dir / 'index.html'}")


@click.command("eval")
@scorer_options
@data_options
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), metavar="DIR",
              help="Writes DIR/metrics.json, DIR/predictions.csv and DIR/index.html. "
                   "Default: reports/eval-<name of the data>/.")
@threshold_option("sensitivity/specificity/F1 count a finding as positive")
@click.option("--bootstrap", "n_boot", default=1000, show_default=True, type=click.IntRange(0),
              help="Bootstrap resamples for the AUC 95% CIs (patients are resampled when the CSV has them).")
@click.option("--within-source", is_flag=True,
              help="Also score each label only against negatives from the same 'source' column value (COVID-QU "
                   "COVID vs COVID-QU normals...), and fit a source probe on the embeddings: where each class comes "
                   "from a different collection, one-vs-rest AUC rewards recognising the collection.")
@friendly_errors
def eval_cmd(model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration, data_csv, mapping,
             split, where, group_split, seed, out_dir, threshold, n_boot, within_source):
    """Evaluate on labelled data: per-label ROC AUC with 95% CI, mean AUC, sensitivity/specificity/
    precision/F1 at the threshold(s), ECE; accuracy, macro-F1 and confusion matrix for multi-class sets."""
    from ..evaluate import run_eval, select_data

    out_dir = Path(out_dir or default_out_dir([data_csv], prefix="eval-"))
    scorer = scorer_from_options(model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration,
                                 image_cache=image_cache())
    data, desc = select_data(data_csv, scorer.label_set, mapping, split, where, group_split, seed)
    logger.info("evaluating %d images of %s (%s) with %s", len(data), data_csv, desc, scorer.backbone.name)
    m = run_eval(scorer, data, out_dir, threshold, n_boot=n_boot, seed=seed, progress=True,
                 extra={"subset": desc}, within_source=within_source)
    _print_eval(m, out_dir)
    if within_source:
        from ..within_source import summary_lines

        click.echo("within source: " + "\n".join(summary_lines(m["within_source"])))
        probe = m["source_probe"]
        if probe:
            click.echo(f"source probe: accuracy {probe['accuracy']:.3f} (balanced {probe['balanced_accuracy']:.3f}, "
                       f"majority {probe['majority']:.3f}) over {', '.join(probe['sources'])}")
    if m["failed"]:
        sys.exit(1)


@click.command("calibrate")
@scorer_options
@data_options
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), metavar="JSON",
              help="Calibration file to write (use it with --calibration).")
@click.option("--target-sensitivity", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="Choose each label's threshold as the highest one reaching this sensitivity (default: Youden's J).")
@friendly_errors
def calibrate_cmd(model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration, data_csv,
                  mapping, split, where, group_split, seed, out_file, target_sensitivity):
    """Fit per-label probability calibration and operating thresholds on labelled data."""
    from ..calibrate import fit_calibration, summary_lines, write_calibration
    from ..evaluate import select_data

    if calibration not in ("auto", "none"):
        raise UserError("calibrate fits a new calibration; do not pass --calibration")
    # "none": fit on the raw prompt logits, never on top of a calibration the model folder ships
    scorer = scorer_from_options(model, label_set, prompt_styles, variants, device, batch_size, adapter, "none",
                                 image_cache=image_cache())
    data, desc = select_data(data_csv, scorer.label_set, mapping, split, where, group_split, seed)
    payload = fit_calibration(scorer, data, "target_sensitivity" if target_sensitivity else "youden",
                              target_sensitivity, progress=True, data_description=desc)
    write_calibration(payload, out_file)
    click.echo("\n".join(summary_lines(payload)))
    click.echo(f"wrote {out_file}", err=True)


@click.command("compare")
@scorer_options
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
    from ..api import resolve_device
    from ..evaluate import select_data
    from ..fileio import atomic_write_text
    from ..labels import load_label_set
    from ..models import load_model
    from ..prompt_experiments import best_prompt_yaml, compare_prompts, format_table, write_compare_outputs

    if adapter or calibration not in ("auto", "none"):
        raise UserError("prompts compare ranks zero-shot prompts; --adapter/--calibration do not apply")
    ls = load_label_set(label_set)
    backbone = load_model(model, device=resolve_device(device))
    data, desc = select_data(data_csv, ls, mapping, split, where, group_split, seed)
    logger.info("comparing prompts on %d images of %s (%s) with %s", len(data), data_csv, desc, backbone.name)
    res = compare_prompts(backbone, ls, data, list(prompt_styles), list(prompt_files), variants,
                          image_cache=image_cache(), batch_size=batch_size, progress=True)
    click.echo(format_table(res))
    if out_dir:
        write_compare_outputs(res, out_dir)
        click.echo(f"wrote {Path(out_dir) / 'index.html'}", err=True)
    if write_best:
        atomic_write_text(write_best, best_prompt_yaml(ls, res))
        click.echo(f"wrote {write_best} (check with: vlm-xray prompts validate {write_best})", err=True)
