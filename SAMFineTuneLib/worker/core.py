"""What outlives the worker's jobs: the loaded segmenter (``WorkerCore``, shared by the TCP
server's connections), and each conversation's recent volumes (``VolumeStore``, one per
connection), which a re-prompt reuses without sending them again. A later connection never
sees an earlier one's volumes, and the server clears the embeddings when a connection ends.

Whatever a client can make a conversation keep is bounded, so a client that sends faster than
the worker runs meets an error naming the limit, not the end of the worker's memory: its waiting
jobs (``JobQueue``), its volumes (``VolumeStore``) and their slices' click results
(``StoredVolume``)."""
from __future__ import annotations

import collections
import os
import platform
import sys
import threading
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .. import protocol
from ..progress import CancelFn, Cancelled
from ..segmenter_cache import SegmenterCache
from ..volume_facts import freeze


# Jobs waiting per conversation; more are refused. The panel queues one job per ROI at once (a
# spine's vertebrae and ribs are 40 and more), so the count stays well above that; the byte limit
# bounds what they hold.
MAX_QUEUED_JOBS = 1000
# A JSON line parsed into Python objects takes up to ~25 times its bytes (a line of empty objects):
# how much a queued job's line weighs against the queue's byte limit.
PARSED_LINE_FACTOR = 32
# Slices whose last click result a volume keeps (each ~0.5 MB: logits and mask); the least recently
# clicked goes first, and a click there starts again from the mask the client sends.
MAX_REFINED_SLICES = 256


class JobQueue(collections.deque):
    """A conversation's waiting jobs (each with a ``weight``: what it holds, in bytes): at most
    ``MAX_QUEUED_JOBS``, together at most ``max_bytes``; a job with none waiting before it always joins."""

    def __init__(self, max_bytes: int):
        super().__init__()
        self.max_bytes = max_bytes

    def refusal(self, weight: int) -> Optional[str]:
        """Why a job of ``weight`` bytes may not join (None: it may); one line for the client."""
        if not self:
            return None
        if len(self) >= MAX_QUEUED_JOBS:
            return (f"queue full: {len(self)} jobs already wait on this connection, the most it may queue "
                    f"({MAX_QUEUED_JOBS}); wait for some to end (or cancel them), then send this one again")
        held = sum(job.weight for job in self)
        if held + weight > self.max_bytes:
            return (f"queue full: the jobs waiting on this connection hold about {held} bytes of arrays and "
                    f"parameters, and this one {weight}, over the {self.max_bytes} byte limit for waiting jobs "
                    "(the server's --max-upload-mb); wait for them to end, or send a volume once and reuse it "
                    "by 'volume_key'")
        return None


def request_weight(message: Dict[str, Any], size: int) -> int:
    """About how much memory a queued request holds: its attachments, and the rest of the ``size``
    bytes it took on the stream (its line) as parsed objects."""
    refs = message.get("arrays") or {}
    attached = sum(ref["data"].nbytes for ref in refs.values()
                   if isinstance(ref, dict) and isinstance(ref.get("data"), np.ndarray))
    return attached + PARSED_LINE_FACTOR * max(0, size - attached)


class StoredVolume:
    """A volume the client sent, the parameters of its last segmentation, and the last click
    result on each slice (``refinement.Refined`` by (axis, index, window)): the next click's
    mask prompt, for the ``MAX_REFINED_SLICES`` slices clicked last."""

    def __init__(self, array: np.ndarray, params: Dict[str, Any]):
        self.array = array
        self.params = params
        self.refined: "collections.OrderedDict[Tuple[Any, ...], Any]" = collections.OrderedDict()

    def keep_refined(self, slot: Tuple[Any, ...], refined: Any) -> None:
        """Keep ``refined`` as the last click result of ``slot``, letting the least recently clicked go."""
        self.refined.pop(slot, None)
        self.refined[slot] = refined
        while len(self.refined) > MAX_REFINED_SLICES:
            self.refined.popitem(last=False)


class UnknownVolume(ValueError):
    """The request names a volume this conversation's worker does not hold: the client sends it
    again with the voxels (the error text starts with the class name)."""


class VolumeStore:
    """One conversation's most recent volumes, with the parameters of their last segmentation."""

    def __init__(self, max_volumes: int = 2):
        self.max_volumes = max_volumes
        self.items: "collections.OrderedDict[str, StoredVolume]" = collections.OrderedDict()
        self.last_key: Optional[str] = None

    def remember(self, key: str, array: np.ndarray, params: Dict[str, Any]) -> None:
        """Keep ``array`` under ``key``, frozen: nothing changes it while it is held, so the facts a
        click asks of the whole volume are worked out once (``volume_facts``)."""
        self.items.pop(key, None)
        self.items[key] = StoredVolume(freeze(array), params)
        while len(self.items) > self.max_volumes:
            self.items.popitem(last=False)
        self.last_key = key

    def get(self, key: Optional[str]) -> Optional[StoredVolume]:
        return self.items.get(key) if key else None

    def held(self, key: Optional[str], resend: str) -> StoredVolume:
        """The volume kept under ``key``, else ``UnknownVolume`` saying how to send it (``resend``)."""
        stored = self.get(key)
        if stored is None:
            raise UnknownVolume(f"this worker holds no volume {key!r} for this connection (it restarted, let it go, "
                                f"or had it from another connection); {resend}")
        return stored

    def keys(self):
        return list(self.items)


class WorkerCore:
    """The segmenter (``SegmenterCache``) and each running job's cancel check.

    ``job_cancelled`` is the cancel() of the job running on the calling thread: each conversation
    runs its jobs on its own thread, so ending one job can never switch off another's check, even
    should two ever overlap (the server admits a next client only once the last one's job ended).
    """

    def __init__(self, log_path: Optional[str] = None):
        self.log_path = log_path
        self.segmenters = SegmenterCache(on_load=self._stop_encoder_on_cancel)
        self._job = threading.local()

    @property
    def job_cancelled(self) -> Optional[CancelFn]:
        """The cancel() of the job on this thread (None when none runs here), for the encoder hooks."""
        return getattr(self._job, "cancelled", None)

    @job_cancelled.setter
    def job_cancelled(self, cancelled: Optional[CancelFn]) -> None:
        self._job.cancelled = cancelled

    @property
    def adapter(self) -> Optional[str]:
        return self.segmenters.adapter

    def get_segmenter(self, cancel: Optional[CancelFn] = None, **options: Any):
        """The warm segmenter for these options (``SegmenterCache.get``: model, checkpoint, device, adapter);
        ``cancel()`` is asked around a load, which keeps nothing when cancelled."""
        return self.segmenters.get(cancel=cancel, **options)

    def loaded_model(self, model: str, checkpoint: Optional[str], device: Optional[str], precision: str,
                     backend: str):
        """The warm model, if it is exactly this one (its encoder's precision and backend too: they
        make the embeddings training learns from) and has no adapter merged in (training reuses it)."""
        return self.segmenters.loaded_model(model, checkpoint, device, precision, backend)

    def _stop_encoder_on_cancel(self, segmenter) -> None:
        """Let a cancel stop the image encoder between its blocks, not only between slices: one slice
        is ~1 s for LiteMedSAM and ~10 s for SAM ViT-B on a CPU. Nothing is cached from a stopped call."""

        def check(module, inputs) -> None:
            cancelled = self.job_cancelled
            if cancelled is not None and cancelled():
                raise Cancelled("cancelled by the user")

        for module in segmenter.model.image_encoder.modules():
            if next(module.children(), None) is not None:
                module.register_forward_pre_hook(check)

    def forget_client(self) -> None:
        """Drop what one client left in the warm segmenter (the model stays warm): its volumes'
        embeddings must not answer the next client's questions, not even by speed, nor ``info``
        name the next client its adapter."""
        segmenter = self.segmenters.segmenter
        if segmenter is not None:
            segmenter.cache.clear()
        self.segmenters.forget_adapter()

    def info(self) -> Dict[str, Any]:
        key = self.segmenters.key
        info: Dict[str, Any] = {
            "protocol": protocol.PROTOCOL_VERSION, "pid": os.getpid(), "python": platform.python_version(),
            "executable": sys.executable, "platform": platform.platform(), "log": self.log_path,
            "model": key[0] if key else None, "adapter": self.adapter, "memory": {},
        }
        try:
            import psutil

            ram = psutil.virtual_memory()
            info["memory"].update(ram_total=ram.total, ram_available=ram.available,
                                  worker_rss=psutil.Process().memory_info().rss)
        except ImportError:
            pass
        try:
            import torch
        except ImportError as exc:
            info.update(torch=None, device=None, cuda_name=None, error=f"torch cannot be imported here: {exc}")
            return info
        info.update(torch=torch.__version__, device="cpu", cuda_name=None, threads=torch.get_num_threads())
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            info.update(device="cuda", cuda_name=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda)
            info["memory"].update(gpu_total=total, gpu_free=free, gpu_allocated=torch.cuda.memory_allocated(),
                                  gpu_reserved=torch.cuda.memory_reserved())
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            info["device"] = "mps"
        return info
