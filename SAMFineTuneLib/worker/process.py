"""Setting up the worker's process: the protocol stream kept clean, everything else to the log.

``python -m SAMFineTuneLib worker`` speaks the protocol (``PROTOCOL.md``) on its stdin/stdout.
fd 1, ``sys.stdout``, warnings and logging all go to the log file (``--log``, default in the
user's cache folder; readable by the user only); only ``protocol.write_message`` writes to the
real stdout. A starting worker deletes the job folders of clients and workers that died.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import platform
import sys
import threading

from .. import protocol
from ..paths import default_log_path, open_private_log, sweep_orphan_job_folders
from .core import WorkerCore
from .session import Session

log = logging.getLogger("SAMFineTuneLib.worker")


def open_log(log_path):
    log_path = os.path.abspath(log_path or default_log_path())
    stream = open_private_log(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    return log_path, stream


def sweep_in_background() -> None:
    """Delete orphaned job folders (patient arrays a killed client left in the temp folder)."""

    def run() -> None:
        for folder in sweep_orphan_job_folders():
            log.info("removed the job folder %s of a process that is gone", folder)

    threading.Thread(target=run, name="samft-sweep", daemon=True).start()


def route_chatter(log_stream, also_stderr: bool) -> None:
    """fd 1 and sys.stdout (and optionally fd 2 / sys.stderr), logging and warnings -> the log file."""
    os.dup2(log_stream.fileno(), 1)
    sys.stdout = log_stream
    if also_stderr:
        os.dup2(log_stream.fileno(), 2)
        sys.stderr = log_stream
    handlers = [logging.StreamHandler(log_stream)]
    if not also_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    faulthandler.enable(log_stream)


def preload_engine() -> None:
    """Import torch and the engine in the background (seconds), so the first job does not wait
    for it when the client started the worker ahead of time. A failure shows up in that job."""

    def run() -> None:
        try:
            from .. import segmenter  # noqa: F401
        except Exception:  # noqa: BLE001 - the job that needs it reports the error
            log.exception("preloading the engine failed")

    threading.Thread(target=run, name="samft-preload", daemon=True).start()


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log", default=default_log_path(),
                        help="log file for everything but the protocol (library output, warnings, tracebacks)")


def worker_main(args: argparse.Namespace) -> int:
    """Serve one client on stdin/stdout until it says shutdown or closes stdin."""
    # Keep the real stdin/stdout for the protocol, then point fds 0/1 elsewhere so nothing else
    # (a library's print, a C extension's printf, input()) can touch the channel.
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(os.devnull, encoding="utf-8")
    log_path, log_stream = open_log(args.log)
    route_chatter(log_stream, also_stderr=True)
    version = protocol.PROTOCOL_VERSION
    log.info("worker started: pid %d, python %s, protocol v%d", os.getpid(), sys.executable, version)
    session = Session(WorkerCore(log_path), proto_in, proto_out, files=True)
    session.send(protocol.event(None, "hello", protocol=version, pid=os.getpid(), log=log_path,
                                python=platform.python_version(), mode="stdio"))
    preload_engine()
    sweep_in_background()
    session.serve()
    log.info("worker stopping")
    # Leave without interpreter teardown: a daemon thread still importing (preload) or stuck in a
    # cancelled job could otherwise hold the exit up. Everything worth keeping is flushed.
    for stream in (proto_out, log_stream):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)
