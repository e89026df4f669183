"""A request's stream inside a simulated engine: the tokens the engine makes arrive on its queue,
and whoever serves the request (the HTTP server, a migration's continuation, the Ray Serve app)
drains them with `take_tokens`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from kvpilot.kvtransfer import protocol
from kvpilot.sim.sequence import Sequence


@dataclass(slots=True, eq=False)
class Stream:
    """A request's view of the engine: tokens arrive on `queue` (counts; None = finished;
    MIGRATED = it continues elsewhere, see `handoff`)."""

    seq: Sequence
    seed: int
    queue: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    last_token_engine_t: float | None = None
    chat: bool = False
    include_usage: bool = False
    created: int = 0
    sent: int = 0                            # tokens already written to the client
    migratable: bool = False                 # the client splices `kvpilot.migrated` events
    migrating: bool = False
    handoff: protocol.Handoff | None = None
    prompt_ids: list[int] | None = None      # `return_token_ids`: ids to report (then each chunk's ids too)


MIGRATED = -1


async def take_tokens(stream: Stream) -> tuple[int, int | None]:
    """The tokens made since the last call (waiting for at least one event), and the event that
    ended the batch: a positive count when the queue ran dry, None when finished, or MIGRATED."""
    item = await stream.queue.get()
    count = 0
    while item is not None and item > 0:
        count += item
        if stream.queue.empty():
            break
        item = stream.queue.get_nowait()
    return count, item
