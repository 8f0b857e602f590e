"""One small LRU cache for what vijax builds once per configuration.

Used for the compiled fit chunks, the compiled optimizer inits and the
abstract family checks. Keys hold functions (families, optimizers, log
joints) that hash by identity; an unhashable key is built every time,
never cached.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Hashable


class LRU:
    """A bounded mapping from hashable keys to values built on first use."""

    def __init__(self, size: int):
        self._size = size
        self._items: collections.OrderedDict = collections.OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value cached for ``key``, else ``make()`` (cached when ``key`` hashes)."""
        try:
            hash(key)
        except TypeError:  # an unhashable callable inside: build without caching
            return make()
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        while len(self._items) > self._size:
            self._items.popitem(last=False)
        return value
