"""The KV-transfer wire protocol: what each side writes, the other reads back unchanged, and a
peer's malformed body is a ValueError (a 4xx), never an unhandled error."""

from __future__ import annotations

import pytest

from kvpilot.kvtransfer import protocol
from kvpilot.kvtransfer.store import BlockDescriptor


def test_blocks_and_manifests_round_trip() -> None:
    descs = [BlockDescriptor("mig:a:0", 4096, 123), BlockDescriptor("mig:a:1", 17, 2**63 - 1)]
    assert protocol.decode_blocks(protocol.encode_blocks(descs)) == descs
    manifest = {7: descs, -3: []}
    wire = protocol.encode_manifest(manifest)
    assert list(wire) == ["7", "-3"]            # JSON object keys are strings
    assert protocol.decode_manifest(wire) == manifest


@pytest.mark.parametrize("raw", [None, "x", [["k", 1]], [["k", "big", 1]], [[1, 2, 3, 4]], {"k": 1}])
def test_malformed_blocks_are_value_errors(raw: object) -> None:
    with pytest.raises(ValueError, match="key, size, checksum"):
        protocol.decode_blocks(raw)


@pytest.mark.parametrize("raw", [None, [], {"x": [["k", 1, 2]]}, {"1": "nope"}])
def test_malformed_manifests_are_value_errors(raw: object) -> None:
    with pytest.raises(ValueError, match="manifest"):
        protocol.decode_manifest(raw)


def test_the_handoff_event_round_trips_and_is_recognised() -> None:
    handoff = protocol.Handoff(target="http://127.0.0.1:9", migration_id="m1",
                               stream=protocol.migration_path("m1", "stream"), tokens_sent=5)
    event = protocol.migrated_event(handoff)
    assert event.startswith(b"event: kvpilot.migrated\ndata: {") and event.endswith(b"\n\n")
    assert protocol.is_migrated_event(event) and not protocol.is_migrated_event(b"data: [DONE]\n\n")
    assert protocol.parse_migrated_event(event) == handoff
    with pytest.raises(ValueError):
        protocol.parse_migrated_event(b"event: kvpilot.migrated\n\n")


def test_paths_match_the_routes_the_engine_registers() -> None:
    assert protocol.migration_path("ab") == protocol.MIGRATION_ROUTE.format(mid="ab")
    assert protocol.migration_path("ab", "commit") == "/kvpilot/migrations/ab/commit"


def test_a_migrate_request_needs_an_http_target_and_a_bounded_delay() -> None:
    ok = protocol.MigrateRequest.model_validate({"request_id": "r", "target": "http://127.0.0.1:1", "extra": 1})
    assert ok.round_delay_s == 0.0
    for bad in ({"request_id": "r", "target": "127.0.0.1:1"}, {"target": "http://x"},
                {"request_id": "r", "target": "http://x", "round_delay_s": -1}):
        with pytest.raises(ValueError):
            protocol.MigrateRequest.model_validate(bad)


def test_migration_state_rejects_a_state_the_target_cannot_adopt() -> None:
    good = {"migration_id": "m", "request_id": "r", "prompt_tokens": 10, "block_hashes": [1, 2], "max_tokens": 20,
            "output": 3, "computed": 12, "seed": 9}
    assert protocol.MigrationState.model_validate(good).cached_tokens == 0
    for key, value in (("output", -1), ("max_tokens", 0), ("block_hashes", "abc")):
        with pytest.raises(ValueError):
            protocol.MigrationState.model_validate({**good, key: value})
