"""Cache-preserving scale-in and pre-warmed scale-out: which hot prefixes move where, and the move.

Affinity routing sends a prefix's requests to the ring owners of its affinity key (DualMap: the
key's two candidates). When a pod leaves, its keys fall to ring successors, which start with a
cold cache for them; when a pod joins, it takes over ~1/N of the keys, again cold. Both cost a
burst of prefill recomputation exactly when capacity is changing. So:

- scale-in: before the pod goes, the router's `plan_scale_in` (router/hot_prefixes.py) lists, per
  remaining pod, the hot prefixes it newly owns once the pod is gone; `PrefixHandover.export`
  pushes the leaving pod's KV of those prefixes to the store, and each successor `import_`s what
  it inherits;
- scale-out: `plan_scale_out` lists the hot prefixes the new pod newly owns; a current owner
  exports them and the new pod imports them before it takes traffic.

Blocks are stored content-addressed by their chained prefix hash (`pfx:{hash:016x}`), so a block
shared by several prefixes moves once. Planning is the router's (it owns the rings); this module is
the transport: export/import go through a `KVAgent` and fail soft: a failed handover means the
successor recomputes, as it would have without one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvpilot.kvtransfer.agent import KVAgent
from kvpilot.kvtransfer.store import BlockDescriptor, TransferError


@dataclass(slots=True, frozen=True)
class HotPrefix:
    key: int                       # the affinity key the router hashes onto its rings
    block_hashes: tuple[int, ...]  # chained hashes of the prefix's KV blocks, in order
    hits: int = 0                  # recent popularity: the most used move first


@dataclass(slots=True)
class Manifest:
    """What an export wrote: per prefix, the blocks a reader pulls (prefixes the source no
    longer fully holds are cut at the first missing block)."""

    prefixes: dict[int, list[BlockDescriptor]] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(d.size for descs in self.prefixes.values() for d in descs)


def prefix_block_key(block_hash: int) -> str:
    return f"pfx:{block_hash:x}"


def block_hash_of(key: str) -> int:
    """The inverse of `prefix_block_key`."""
    return int(key[4:], 16)


class PrefixHandover:
    """Moves prefixes' KV through a store: the source's `read_block(hash)` gives a block's
    bytes (None: no longer cached); the target's import returns them by hash."""

    def __init__(self, agent: KVAgent) -> None:
        self.agent = agent

    async def export(self, prefixes: Sequence[HotPrefix], read_block: Callable[[int], bytes | None]) -> Manifest:
        """Write the prefixes' blocks and answer what a reader pulls. `read_block` (a copy out of
        a cache) and the checksums run in a worker thread (`KVAgent.off_loop`), not on the caller's loop."""

        def plan() -> tuple[Manifest, list[BlockDescriptor], list[bytes]]:
            manifest = Manifest()
            written: dict[int, BlockDescriptor] = {}
            descs_out: list[BlockDescriptor] = []
            buffers: list[bytes] = []
            for p in prefixes:
                descs: list[BlockDescriptor] = []
                for h in p.block_hashes:
                    if h not in written:
                        data = read_block(h)
                        if data is None:
                            break
                        written[h] = self.agent.describe([prefix_block_key(h)], [data])[0]
                        descs_out.append(written[h])
                        buffers.append(data)
                    descs.append(written[h])
                if descs:
                    manifest.prefixes[p.key] = descs
            return manifest, descs_out, buffers

        try:
            manifest, descs, buffers = await self.agent.off_loop(plan)
            if descs:
                await self.agent.post_write(descs, buffers).wait()
        except TransferError:
            return Manifest()  # nothing to pull: the successors recompute
        return manifest

    async def import_(self, manifest: Manifest) -> dict[int, bytes]:
        """Block hash → bytes for every block pulled and verified; {} when the store failed."""
        unique = {d.key: d for descs in manifest.prefixes.values() for d in descs}
        if not unique:
            return {}
        try:
            data = await self.agent.post_read(list(unique.values())).wait()
        except TransferError:
            return {}
        by_key = dict(zip(unique, data, strict=True))
        return {block_hash_of(k): by_key[k] for k in unique}
