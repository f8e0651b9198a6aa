"""Async helpers: merge several choice streams into one, enforce a deadline, format SSE events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from services.errors import RequestTimeoutError

_END = object()


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of every stream as (index, item) as soon as they come; closing this closes them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, _END))
        except BaseException as error:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def with_deadline(stream: AsyncIterator, seconds: float) -> AsyncIterator:
    """Re-yield `stream`, raising RequestTimeoutError once `seconds` have passed in total."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError as error:
                raise RequestTimeoutError(f"request exceeded its time limit of {seconds:g} s") from error
            yield item
    finally:
        await stream.aclose()


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_DONE = sse("[DONE]")
