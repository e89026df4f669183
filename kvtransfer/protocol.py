"""The one wire protocol for moving KV between instances: live migration, prefix handover, P/D.

Router, simulator and the vLLM connector each speak one side of it; keeping paths, headers, the
SSE handoff event and the block-descriptor encoding here means a change is made once and both
sides move together. Bodies that cross the wire are typed (pydantic) where a peer can send them
wrong; block lists stay plain `[key, size, checksum]` triples, the compact form every side already
stores in JSON (P/D `kv_transfer_params`, manifests).

Engine endpoints (served by `kvpilot sim serve`; see kvtransfer/README.md for the flows):

| path | side | what |
|---|---|---|
| `POST MIGRATE` | source | move running request `request_id` to `target` (`MigrateRequest`) |
| `POST migration_path(id, "blocks")` | target | pull one pre-copy round (`{"blocks": [...]}`) |
| `POST migration_path(id, "commit")` | target | pull the last delta and adopt the request (`{"blocks", "state"}`) |
| `DELETE migration_path(id)` | target | drop an aborted migration |
| `GET migration_path(id, "stream")` | target | the adopted request's SSE continuation |
| `POST PREFIX_EXPORT` / `PREFIX_IMPORT` | leaving / successor pod | prefix-cache handover |
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kvpilot import sse
from kvpilot.kvtransfer.store import BlockDescriptor

# -- headers ------------------------------------------------------------------------------------
REQUEST_ID = "X-Request-Id"                 # the client's id; a migration names its request by it
MIGRATABLE = "X-Kvpilot-Migratable"         # "1": the caller can splice a migrated stream

# -- engine endpoints -----------------------------------------------------------------------------
MIGRATE = "/kvpilot/migrate"
MIGRATIONS = "/kvpilot/migrations"
MIGRATION_ROUTE = MIGRATIONS + "/{mid}"     # aiohttp route pattern of one migration
PREFIX_EXPORT = "/kvpilot/prefixes/export"
PREFIX_IMPORT = "/kvpilot/prefixes/import"


def migration_path(migration_id: str, part: str = "") -> str:
    """Path of one migration on its target, or of one of its parts ("blocks", "commit", "stream")."""
    return f"{MIGRATIONS}/{migration_id}" + (f"/{part}" if part else "")


# -- the SSE handoff event -----------------------------------------------------------------------------
MIGRATED_EVENT = "kvpilot.migrated"
_MIGRATED_PREFIX = f"event: {MIGRATED_EVENT}\n".encode()


class MigrateRequest(BaseModel):
    """`POST MIGRATE` on the source engine."""

    model_config = ConfigDict(extra="ignore")
    request_id: str
    target: str = Field(pattern=r"^https?://")
    round_delay_s: float = Field(0.0, ge=0.0, le=10.0)   # test knob: space the pre-copy rounds


class Handoff(BaseModel):
    """Where a migrated stream continues: the data of the source's last SSE event."""

    model_config = ConfigDict(extra="allow")
    target: str
    migration_id: str
    stream: str                 # path on `target` of the continuation
    tokens_sent: int = 0        # tokens the source streamed before it stopped


class MigrationState(BaseModel):
    """What the target needs to adopt a migrated request at the position the source stopped it
    (the body's `state` in `commit`): the engine's view of the sequence and the stream's."""

    model_config = ConfigDict(extra="ignore")
    migration_id: str
    request_id: str
    prompt_tokens: int = Field(ge=0)
    block_hashes: list[int]
    max_tokens: int = Field(ge=1)
    output: int = Field(ge=0)
    computed: int = Field(ge=0)
    cached_tokens: int = Field(0, ge=0)
    seed: int
    chat: bool = False
    include_usage: bool = False
    created: int = 0


def migrated_event(handoff: Handoff) -> bytes:
    """The SSE event a source ends a migrated stream with."""
    return sse.event(handoff.model_dump(), MIGRATED_EVENT)


def is_migrated_event(event: bytes) -> bool:
    return event.startswith(_MIGRATED_PREFIX)


def parse_migrated_event(event: bytes) -> Handoff:
    """The handoff carried by a `migrated_event`; ValueError when it has none."""
    line = next((x for x in event.split(b"\n") if x.startswith(b"data: ")), None)
    if line is None:
        raise ValueError("migrated event without data")
    return Handoff.model_validate_json(line[6:])


# -- block descriptors ------------------------------------------------------------------------------
def encode_blocks(descs: list[BlockDescriptor]) -> list[list[Any]]:
    """Descriptors as `[key, size, checksum]` triples (JSON-ready)."""
    return [[d.key, d.size, d.checksum] for d in descs]


def decode_blocks(raw: Any) -> list[BlockDescriptor]:
    """The inverse of `encode_blocks`; ValueError on anything else (a peer's bad body)."""
    if not isinstance(raw, list):
        raise ValueError("blocks must be a list of [key, size, checksum]")
    try:
        return [BlockDescriptor(str(key), int(size), None if crc is None else int(crc)) for key, size, crc in raw]
    except (TypeError, ValueError) as e:
        raise ValueError(f"blocks must be a list of [key, size, checksum]: {e}") from None


def encode_manifest(prefixes: dict[int, list[BlockDescriptor]]) -> dict[str, list[list[Any]]]:
    """A handover manifest (prefix key → its blocks) for JSON: keys become strings."""
    return {str(k): encode_blocks(descs) for k, descs in prefixes.items()}


def decode_manifest(raw: Any) -> dict[int, list[BlockDescriptor]]:
    """The inverse of `encode_manifest`; ValueError on anything else."""
    if not isinstance(raw, dict):
        raise ValueError("manifest must be {prefix key: [[block key, size, checksum], ...]}")
    try:
        return {int(k): decode_blocks(v) for k, v in raw.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"manifest must be {{prefix key: [[block key, size, checksum], ...]}}: {e}") from None


# -- pre-warming from a shared store (vLLM engines running `KvpilotRedisConnector`) --------------
# vLLM has no prefix export/import endpoints; its engines share KV through the store instead. The
# router warms a pod by sending it a hot prefix as an ordinary 1-token completion whose
# `kv_transfer_params` carry `{WARM_REPORT: true}`: the connector loads the stored blocks into the
# pod's prefix cache and answers, in the response's `kv_transfer_params`, a `WarmReport` — where
# the prompt's KV came from — so the router counts what moved without racing other requests
# on the pod's metric counters.
WARM_REPORT = "kvpilot_report"


class WarmReport(BaseModel):
    """Where one request's prompt KV came from (the connector's answer to `WARM_REPORT`)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    local_tokens: int = Field(ge=0, alias="kvpilot_local_tokens")        # the pod's own prefix cache
    loaded_tokens: int = Field(ge=0, alias="kvpilot_loaded_tokens")      # loaded from the store
    loadable_tokens: int = Field(ge=0, alias="kvpilot_loadable_tokens")  # full blocks before the last token

    def wire(self) -> dict[str, int]:
        return self.model_dump(by_alias=True)

    def held(self) -> bool:
        """The pod now holds every full block of the prompt without having computed any."""
        return self.local_tokens + self.loaded_tokens >= self.loadable_tokens


def warm_report(params: Any) -> WarmReport | None:
    """The report in a response's `kv_transfer_params`; None when there is none (an engine
    without kvpilot's connector, which leaves the field out)."""
    if not isinstance(params, dict) or "kvpilot_loaded_tokens" not in params:
        return None
    try:
        return WarmReport.model_validate(params)
    except ValueError:
        return None


# -- a resume's continuation (router/resume_cut.py) --------------------------------------------
# The router cuts a stream just after the source filled a block, so the source's background write
# of that block may still be in flight when the target looks it up. The continuation's
# `kv_transfer_params` say how many leading blocks the source has saved or is saving and how long
# the target's connector may wait for them (then it loads what is there and computes the rest).
RESUME_BLOCKS = "kvpilot_resume_blocks"
RESUME_WAIT_S = "kvpilot_wait_s"


def resume_wait(params: Any) -> tuple[int, float]:
    """(blocks to wait for, seconds at most) from a request's `kv_transfer_params`; (0, 0.0) for a
    request that is no resume or whose values do not parse (then nothing waits)."""
    if not isinstance(params, dict):
        return 0, 0.0
    try:
        blocks, wait_s = int(params.get(RESUME_BLOCKS, 0)), float(params.get(RESUME_WAIT_S, 0.0))
    except (TypeError, ValueError):
        return 0, 0.0
    return (blocks, wait_s) if blocks > 0 and wait_s > 0 else (0, 0.0)
