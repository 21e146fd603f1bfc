"""`vlm-xray` command line: assembles the click group from `vlm.commands`.

Exit codes: 0 success; 1 some inputs failed (the rest were processed); 2 usage or
configuration error (unknown model, label set, bad file) reported in one line.
Importing this module (and `vlm-xray --help`) does not import torch.
"""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. Read once, when torch loads its OpenMP runtime, so it is
# set here, before any command imports torch; a value the user exported wins. Why: on a machine whose
# cores are shared (decode workers, the report writer, other jobs) spinning threads took the cores those
# need - 2 encoder threads beside a decode worker ran a batch 3x slower than with PASSIVE
# (benchmarks/RESULTS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402 - after the OpenMP setting, on purpose

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


def run() -> None:
    """The `vlm-xray` console entry point: `main`, then a fast exit.

    Why: with torch, open_clip and transformers loaded, the interpreter's own teardown (freeing their
    modules object by object) takes ~1.1 s - a sixth of a single-image `analyze` - after every output
    is already written and closed. atexit handlers (Ray's shutdown, multiprocessing's, logging's) still
    run; only the teardown is skipped, and only when no non-daemon thread is still at work."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    _fast_exit(code)


def _fast_exit(code) -> None:
    import atexit
    import sys
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)  # someone is still working: the normal exit waits for them
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what sys.exit("message") does
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (e.g. `| head`): nothing more can be written
            pass
    os._exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    run()
