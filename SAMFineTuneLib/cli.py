"""``python -m SAMFineTuneLib <command>``: one entry point, one module per command.

Commands are looked up lazily so ``--help`` and light commands start without importing torch.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

from .cli_args import OneLineParser

# command -> (module, add-arguments function, main function, one-line help)
COMMANDS = {
    "segment": ("segment_cli", "add_segment_arguments", "segment_main",
                "segment a structure inside a 3D box, slice by slice, and write the mask"),
    "refine": ("refine_cli", "add_arguments", "main",
               "correct slices of a mask with clicks (I,J,K,+1 / -1), and carry a corrected slice on (--propagate)"),
    "export": ("dataset.cli", "add_arguments", "main", "export volumes + labels as a training set"),
    "train": ("training.cli", "add_arguments", "main", "fine-tune a LoRA adapter on the mask decoder"),
    "evaluate": ("evaluate", "add_arguments", "main", "score base and adapted models on a dataset"),
    "demo": ("demo", "add_arguments", "main",
             "segment a synthetic CT with LiteMedSAM, then fine-tune an adapter and compare (no data needed)"),
    "worker": ("worker.process", "add_worker_arguments", "worker_main",
               "run the background worker on stdin/stdout (started by the client)"),
    "serve": ("worker.server", "add_serve_arguments", "serve_main",
              "run the worker on a loopback TCP port (for a GPU box behind an SSH tunnel)"),
}


def _command_module(name: str):
    module_name = COMMANDS[name][0]
    return importlib.import_module(f"{__package__}.{module_name}")


def build_parser(argv: List[str]) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m SAMFineTuneLib",
        description="SAMFineTune: Segment Anything for 3D medical volumes, slice by slice, that learns from you.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, add_name, _, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == chosen:  # only import the module of the command being run
            getattr(_command_module(name), add_name)(command)
    return parser


def printable_output() -> None:
    """Windows: stdout and stderr redirected to a file or pipe write the ANSI code page (cp1252, ...),
    strictly, so a path it cannot spell would end a finished run in a UnicodeEncodeError; such
    characters are written as escapes instead. A console (UTF-8) and other systems are left as they are."""
    if os.name != "nt":
        return
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", None) == "strict":
            stream.reconfigure(errors="backslashreplace")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    printable_output()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    run = getattr(_command_module(args.command), COMMANDS[args.command][2])
    try:
        return int(run(args) or 0)
    except (ValueError, FileNotFoundError) as error:  # bad input: the message says what to change
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a write that did not land, a folder another process holds, no permission
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
