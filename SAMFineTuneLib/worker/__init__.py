"""The background worker: runs SAMFineTune's heavy jobs in their own process.

``python -m SAMFineTuneLib worker`` speaks the protocol (``PROTOCOL.md``) on its stdin/stdout;
``python -m SAMFineTuneLib serve --port N`` speaks it on a TCP socket (loopback by default,
always with a token: ``$SAMFINETUNE_TOKEN``, a ``--token-file`` only its owner can read, or on
loopback a fresh one it prints; any other address needs one of the first two). The worker keeps one Segmenter
(model + embedding cache) warm between jobs and connections, runs one job at a time on a job
thread and keeps reading requests on the main thread, so ``cancel`` and ``ping`` are answered
while a job runs.

- ``core``: what outlives jobs (the segmenter) and a conversation's recent volumes;
- ``session``: one conversation (the protocol loop, immediate commands, the job thread) and
  ``RunningJob``, the request being run;
- ``access``: which of the worker's files a conversation may name;
- ``jobs``: the job handlers (segment, reprompt, load_model, export, train, evaluate, echo);
- ``process``: setting up the worker's process (log, clean protocol stream) and stdio serving;
- ``server``: serving on a TCP port.

Imports neither torch nor the engine until a job needs them.
"""
from __future__ import annotations

import argparse

from .access import PathAccess
from .core import StoredVolume, VolumeStore, WorkerCore
from .jobs import HANDLERS, PATH_PARAMS, SEGMENT_PARAMS, SEGMENTER_KEYS
from .process import add_worker_arguments, worker_main
from .server import MIN_TOKEN_LENGTH, TOKEN_ENV, add_serve_arguments, is_loopback, serve_main
from .session import RunningJob, Session


def main_argv(argv=None) -> int:
    """``python -m SAMFineTuneLib.worker {worker,serve} ...`` (the package CLI dispatches the same way)."""
    parser = argparse.ArgumentParser(prog="python -m SAMFineTuneLib.worker")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, add, text in (("worker", add_worker_arguments, "serve one client on stdin/stdout"),
                            ("serve", add_serve_arguments, "serve clients on a TCP port")):
        add(commands.add_parser(name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    args = parser.parse_args(argv)
    return worker_main(args) if args.command == "worker" else serve_main(args)


__all__ = ["HANDLERS", "MIN_TOKEN_LENGTH", "PATH_PARAMS", "PathAccess", "RunningJob", "SEGMENTER_KEYS",
           "SEGMENT_PARAMS", "Session", "StoredVolume", "TOKEN_ENV", "VolumeStore", "WorkerCore",
           "add_serve_arguments", "add_worker_arguments", "is_loopback", "main_argv", "serve_main", "worker_main"]
