"""The model LRU builds each key once, even for a caller that arrives just as a build finishes."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402


class _SpyLock:
    """The cache's lock; after each release it runs ``on_release`` (outside the lock)."""

    def __init__(self, on_release) -> None:
        self._lock = threading.Lock()
        self.on_release = on_release

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()
        self.on_release()


def test_caller_between_build_and_insert_does_not_build_again() -> None:
    cache = app.LRUCache(maxsize=4)
    builds: list[int] = []
    late: list = []

    def factory():
        builds.append(1)
        return object()

    def on_release() -> None:
        # the moment a build has finished and no build lock is left, yet the value is not cached:
        # a second request arriving now must not build the model again
        if builds and not late and "k" not in cache._building and "k" not in cache._data:
            late.append(None)
            t = threading.Thread(target=lambda: late.append(cache.get("k", factory)))
            t.start()
            t.join(10)

    cache._lock = _SpyLock(on_release)
    value = cache.get("k", factory)
    assert len(builds) == 1, "the same key was built twice"
    assert cache.get("k", factory) is value
    assert not cache._building


def test_many_threads_build_each_key_once() -> None:
    cache = app.LRUCache(maxsize=16)
    counts: dict[int, int] = {}
    count_lock = threading.Lock()
    start = threading.Barrier(24)

    def factory_for(k: int):
        def f():
            with count_lock:
                counts[k] = counts.get(k, 0) + 1
            return k
        return f

    def worker(i: int) -> None:
        start.wait(10)
        for r in range(200):
            k = (i + r) % 6
            assert cache.get(k, factory_for(k)) == k

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert counts == dict.fromkeys(range(6), 1)
    assert not cache._building
