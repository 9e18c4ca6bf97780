"""An asyncio event loop on a daemon thread, driven from synchronous (any-thread) code."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from p2pcod.errors import SwarmError

T = TypeVar("T")


class LoopThread:
    """Owns one event loop running forever on its own thread; `run` is thread-safe."""

    def __init__(self, name: str = "p2pcod-swarm-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed:
            coro.close()
            raise SwarmError("the swarm's event loop is closed (shut down)")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None, what: str = "operation") -> T:
        """Run `coro` on the loop and wait; after `timeout` it is cancelled and SwarmError raised."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.run called from its own loop thread (would deadlock)")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise SwarmError(f"{what} did not finish within {timeout:.1f} s") from None
        except concurrent.futures.CancelledError:
            raise SwarmError(f"{what} was cancelled (shutting down)") from None

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is still running, stop the loop and join the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():

            async def _cancel_all() -> None:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            with contextlib.suppress(Exception):  # best effort: stopping must not fail
                asyncio.run_coroutine_threadsafe(_cancel_all(), self.loop).result(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
