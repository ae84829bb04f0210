"""A bounded, thread-safe LRU of image embeddings.

The encoder is >95% of the cost of a slice; keeping embeddings lets a second box, a re-prompt
or a tracking pass on the same slices skip it. Bounded by bytes, since a 100-slice volume holds
400 MB of embeddings.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable, Optional

import torch


class EmbeddingCache:
    def __init__(self, max_bytes: int = 2 << 30):
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[Hashable, torch.Tensor]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Optional[torch.Tensor]:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def peek(self, key: Hashable) -> Optional[torch.Tensor]:
        """The entry of ``key`` without counting a hit or a miss or making it recent (for copying out)."""
        with self._lock:
            return self._items.get(key)

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = value.element_size() * value.nelement()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.element_size() * old.nelement()
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.element_size() * evicted.nelement()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
