"""`vlm-xray` command line: assembles the click group from `vlm.commands`.

Exit codes: 0 success; 1 some inputs failed (the rest were processed); 2 usage or
configuration error (unknown model, label set, bad file) reported in one line.
Importing this module (and `vlm-xray --help`) does not import torch.
"""
from __future__ import annotations

import click

from .commands.adapt import fewshot_study_cmd, finetune_cmd
from .commands.cache import cache as cache_cmd
from .commands.common import setup_logging
from .commands.evaluate import calibrate_cmd, eval_cmd, prompts_compare
from .commands.explain import explain_cmd
from .commands.info import labels_cmd, models, prompts, variants_cmd
from .commands.pretrain import pretrain_command, pretrain_stage2_command
from .commands.score import analyze, batch
from .commands.serve import serve_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="vlm-xray")
@click.option("--verbose", "-v", count=True, help="Debug messages from the library, with their module names.")
@click.option("--quiet", "-q", is_flag=True, help="Only errors on stderr (results still go to stdout).")
def main(verbose, quiet):
    """vlm-xray: zero-/few-shot reading of medical images with CLIP-style models.

    Research software, NOT a diagnostic device. Start with:

        vlm-xray analyze examples/nih_00000001_000.png --threshold 0.4
    """
    setup_logging(verbose, quiet)


prompts.add_command(prompts_compare)
main.add_command(cache_cmd)
for command in (analyze, batch, explain_cmd, eval_cmd, calibrate_cmd, finetune_cmd, fewshot_study_cmd, pretrain_command,
                pretrain_stage2_command, labels_cmd, prompts, variants_cmd, models, serve_cmd):
    main.add_command(command)


if __name__ == "__main__":  # pragma: no cover
    main()
