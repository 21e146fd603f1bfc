"""`vlm-xray analyze` and `vlm-xray batch`: score images and write tables, JSON and reports."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import (UserError, default_out_dir, friendly_errors, heatmap_options, image_cache, input_options,
                     load_options_from, ood_option, scorer_from_options, scorer_options, threshold_option)

def _ood_note(result) -> str | None:
    ood = result.ood or {}
    if ood.get("in_distribution") is False:
        return f"  WARNING: out of distribution for this model/label set: {ood.get('reason')}"
    if ood.get("available") is False:
        return f"  note: no out-of-distribution check ({ood.get('reason')})"
    return None


def format_table(result) -> str:
    lines = [f"{result.image}  (model {result.model}, labels {result.label_set}, "
             f"{len(result.variants)} variants x {len(result.prompt_styles)} prompt styles)"]
    width = max(len(f.display or f.label) for f in result.findings)
    lines.append(f"  {'finding':<{width}}  {'prob':>6}  {'+/-':>6}  {'thr':>5}  call")
    for f in sorted(result.findings, key=lambda f: -f.probability):
        call = "POSITIVE" if f.positive else "-"
        lines.append(f"  {(f.display or f.label):<{width}}  {f.probability:6.3f}  {f.uncertainty:6.3f}  "
                     f"{f.threshold:5.2f}  {call}")
    lines += [f"  input warning: {w}" for w in result.input_warnings]
    note = _ood_note(result)
    return "\n".join(lines + ([note] if note else []))


def _write_json(results, json_out: str, single: bool) -> None:
    from ..fileio import atomic_write_text
    from ..results import to_json

    payload = [r.to_dict() for r in results]
    text = to_json(payload[0] if single and payload else payload)
    if json_out == "-":
        click.echo(text)
    else:
        atomic_write_text(json_out, text + "\n")
        click.echo(f"wrote {json_out}", err=True)


@click.command()
@click.argument("images", nargs=-1, required=True)
@scorer_options
@threshold_option()
@click.option("--json", "json_out", default=None, metavar="PATH|-",
              help="Write results as JSON (one object per image, a list for several); '-' for stdout.")
@click.option("--html", "html_out", default=None, metavar="PATH",
              help="Write a structured HTML report (offline charts). Several images: PATH is a folder "
                   "(or use `vlm-xray batch`).")
@click.option("--markdown", "md_out", default=None, metavar="PATH",
              help="Write the report as Markdown. Several images: PATH is a folder.")
@click.option("--clinical", default=None, metavar="TEXT", help="Clinical information shown in the report.")
@input_options
@ood_option
@heatmap_options
@friendly_errors
def analyze(images, model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration, threshold,
            json_out, html_out, md_out, clinical, window, max_pixels, include_phi, multiframe, ood, heatmaps,
            heatmap_method):
    """Score IMAGES (files, folders or globs; PNG, JPEG, 8/16-bit, RGB(A), DICOM).

    Prints, per image, each finding's probability (mean over preprocessing variants x prompt
    styles), its uncertainty (standard deviation over the same), and whether it reaches
    --threshold. Unreadable files are reported on stderr and the others still scored (exit 1).
    """
    from ..images import discover
    from ..results import ImageFailure

    found = discover(list(images))
    paths = found.images
    for entry, reason in found.skipped:
        click.echo(f"error: {entry}: {reason}", err=True)
    if not paths:
        raise UserError(f"no images found in: {' '.join(images)}")
    for opt, target in (("--html", html_out), ("--markdown", md_out)):
        if target and len(paths) > 1 and (Path(target).suffix or Path(target).is_file()):
            raise UserError(f"{opt} {target}: with several images {opt} takes a folder; "
                            "or use `vlm-xray batch IMAGES --out DIR` for reports with an index")
    load_options = load_options_from(window, max_pixels, include_phi, multiframe)
    scorer = scorer_from_options(model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration,
                                 load_options=load_options, ood=ood)
    results, failures = [], list(found.skipped)
    for out in scorer.score(paths, threshold, progress=len(paths) > 8):
        if isinstance(out, ImageFailure):
            failures.append(out)
            click.echo(f"error: {out.image}: {out.reason}", err=True)
        else:
            if heatmaps:
                from ..explain import attach_heatmaps

                attach_heatmaps(scorer, out, _heatmap_dir(html_out, md_out, json_out), heatmap_method, load_options)
            results.append(out)
            if json_out != "-":
                click.echo(format_table(out))
    if json_out:
        _write_json(results, json_out, single=len(paths) == 1)
    if (html_out or md_out) and results:
        from ..report import write_reports

        for written in write_reports(results, scorer.backbone, html_out, md_out, clinical, single=len(paths) == 1):
            click.echo(f"wrote {written}", err=True)
    if failures:
        sys.exit(1)


def _heatmap_dir(*outputs) -> Path:
    """Overlay PNGs go beside the first report/JSON written to a file, else to reports/heatmaps/."""
    for out in outputs:
        if out and out != "-":
            target = Path(out)
            return (target if not target.suffix else target.parent) / "heatmaps"
    return Path("reports") / "heatmaps"


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@scorer_options
@click.option("--out", "-o", "out_dir", default=None, metavar="DIR", type=click.Path(file_okay=False),
              help="Output folder: index.html, reports/, findings.csv/json, errors.csv. "
                   "Default: reports/<name of the first input>/.")
@threshold_option()
@click.option("--clinical", default=None, metavar="TEXT", help="Clinical information shown in every report.")
@click.option("--chunk-size", default=32, show_default=True, type=click.IntRange(1),
              help="Images scored per chunk; reports are written after each chunk.")
@click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: this process + decode workers; ray: Ray Data (pip install 'vlm-xray[ray]').")
@click.option("--ray-address", default=None, metavar="auto|ray://HOST:PORT",
              help="--engine ray: the cluster to use. Default: a local Ray instance on this machine.")
@click.option("--num-workers", default=None, type=click.IntRange(0), metavar="N",
              help="local: decode worker processes (default: CPUs - 1); ray: model replicas (default 1).")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the image encoder (local engine).")
@click.option("--recursive/--no-recursive", default=True, show_default=True,
              help="Scan folders recursively (images are found by content, whatever their suffix).")
@click.option("--follow-symlinks", is_flag=True, help="Follow symbolic links to folders (loops are detected).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing batch folder instead of resuming it (never a folder that is not a batch's).")
@click.option("--no-html-reports", "no_html", is_flag=True,
              help="Write each image's JSON but not its HTML page (archive-scale runs: about a tenth faster on two "
                   "cores and ~24 KB less an image); index.html and findings.csv/json as always. Running the same "
                   "command again without it adds the pages without scoring again.")
@input_options
@ood_option
@heatmap_options
@friendly_errors
def batch(inputs, model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration, out_dir,
          threshold, clinical, chunk_size, engine, ray_address, num_workers, compile_model, recursive, follow_symlinks,
          overwrite, no_html, window, max_pixels, include_phi, multiframe, ood, heatmaps, heatmap_method):
    """Score INPUTS (files, folders, globs, or a .csv list with a `filename` column relative to it)
    and write a report per image plus a sortable index to --out DIR.

    Re-running the same command resumes: images already reported with the same model, labels,
    variants, styles and threshold are not scored again. Exit code 1 if some inputs failed
    (listed in DIR/errors.csv).
    """
    from ..batch import run_batch

    out_dir = out_dir or default_out_dir(inputs)
    from ..engines import get_engine

    if engine == "ray":
        options = {"address": ray_address, "num_workers": num_workers}
    else:
        options = {"num_workers": num_workers, "compile": compile_model}
    scorer = scorer_from_options(model, label_set, prompt_styles, variants, device, batch_size, adapter, calibration,
                                 image_cache=image_cache(),  # new prompts/thresholds: only text work
                                 load_options=load_options_from(window, max_pixels, include_phi, multiframe), ood=ood)
    try:
        summary = run_batch(scorer, inputs, out_dir, threshold, clinical=clinical, chunk_size=chunk_size,
                            engine=get_engine(engine, **options), overwrite=overwrite, recursive=recursive,
                            follow_symlinks=follow_symlinks, heatmaps=(heatmap_method or "auto") if heatmaps else None,
                            html_reports=not no_html)
    except KeyboardInterrupt:
        click.echo("interrupted; finished reports are kept - run the same command again to resume", err=True)
        sys.exit(130)
    click.echo(str(summary))
    for f in summary.failed:
        click.echo(f"error: {f.image}: {f.reason}", err=True)
    sys.exit(summary.exit_code)
