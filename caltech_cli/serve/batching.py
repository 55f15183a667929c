"""Requests that arrive together, one network call: the server's dynamic batching.

A request's images wait at most ``wait_s`` for other requests' to join them, up to ``max_images``
in one call (a request of more runs in calls of ``max_images``); the calls run one at a time in
a thread of their own, so the event loop keeps taking requests while the network runs
(PyTorch's threads do the parallel work inside a call).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import torch


class Batcher:
    """Collects the inputs of concurrent requests into batches of ``probabilities`` calls."""

    def __init__(self, probabilities: Callable[[torch.Tensor], torch.Tensor], max_images: int, wait_s: float) -> None:
        self.probabilities = probabilities
        self.max_images = max_images
        self.wait_s = wait_s
        self.calls = 0  # network calls made, for /health and the tests
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The probabilities of ``inputs`` (one request's images), computed with whatever else arrives."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run())
        answer = asyncio.get_running_loop().create_future()
        await self._queue.put((inputs, answer))
        return await answer

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        held = None  # a request that did not fit the last call: it opens the next one
        while True:
            waiting = [held if held is not None else await self._queue.get()]
            held = None
            images = len(waiting[0][0])
            deadline = loop.time() + self.wait_s
            while images < self.max_images and (left := deadline - loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(self._queue.get(), timeout=left)
                except TimeoutError:
                    break
                if images + len(item[0]) > self.max_images:
                    held = item
                    break
                waiting.append(item)
                images += len(item[0])
            batch = torch.stack([tensor for inputs, _ in waiting for tensor in inputs])
            try:
                # A request of more images than a call holds runs in calls of max_images.
                chunks = [batch[i : i + self.max_images] for i in range(0, len(batch), self.max_images)]
                probs = torch.cat([await asyncio.to_thread(self.probabilities, chunk) for chunk in chunks])
            except Exception as error:  # every request of the batch hears of it; the server goes on
                for _, answer in waiting:
                    if not answer.done():
                        answer.set_exception(error)
                continue
            self.calls += len(chunks)
            start = 0
            for inputs, answer in waiting:
                if not answer.done():  # a client that left does not stop the others
                    answer.set_result(probs[start : start + len(inputs)])
                start += len(inputs)
