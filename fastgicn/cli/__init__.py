"""The `fastgicn` command: segment slides, train, make synthetic slides, summarise models.

This package holds main, the top parser and the SIGTERM handling; each command group's flags and code live in
its own module (segment, train, annotations: mask and evaluate, tools: synth, export, bench, models), which
imports what a command needs only when it runs, so the CLI starts fast.

Library errors (FastGicnError) are printed as one line naming the file or value and the fix, exit status 2;
only main (here) turns them into an exit status.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from ..errors import FastGicnError
from . import annotations, segment, tools, train
from .annotations import add_annotation_rules, annotation_rules, cmd_evaluate, cmd_mask
from .common import parse_size
from .segment import SEGMENT_EPILOG, cmd_segment, read_slide_list
from .tools import cmd_bench, cmd_export, cmd_models, cmd_synth
from .train import cmd_train

__all__ = ["SEGMENT_EPILOG", "Terminated", "add_annotation_rules", "annotation_rules", "build_parser",
           "cmd_bench", "cmd_evaluate", "cmd_export", "cmd_mask", "cmd_models", "cmd_segment", "cmd_synth",
           "cmd_train", "main", "parse_size", "read_slide_list"]

# `fastgicn -h` lists the commands in this order
COMMANDS = (segment.add_segment, tools.add_synth, train.add_train, annotations.add_mask,
            annotations.add_evaluate, tools.add_export, tools.add_bench, tools.add_models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgicn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so the same cleanup runs (partial outputs removed)."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        return args.func(args)
    except FastGicnError as exc:
        print(f"fastgicn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        what = ("partial outputs removed, finished slides kept; run the same command to resume"
                if args.command == "segment" else "finished outputs are kept")
        print(f"fastgicn {args.command}: terminated (SIGTERM): {what}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"fastgicn {args.command}: interrupted; finished outputs are kept", file=sys.stderr)
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
