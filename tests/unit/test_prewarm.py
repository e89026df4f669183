"""Scale-event handover on vLLM engines sharing kvpilot's store (pure parts): which moves a
completion can warm, the warm request, the connector's report, and the round's outcome."""

from __future__ import annotations

from kvpilot.kvtransfer.protocol import WARM_REPORT, WarmReport, warm_report
from kvpilot.kvtransfer.vllm_blocks import BlockPlanner, warm_answer
from kvpilot.router.config import ModelConfig
from kvpilot.router.hot_prefixes import Hot, HotPrefixes, Move, batches, combine
from kvpilot.router.prewarm import tally, warm_body, warmable
from kvpilot.tokens import block_hashes

BS = 4


def move(key: int, target: str = "b", *, text: str = "x" * 64, chat: bool = False, hits: int = 2) -> Move:
    return Move("a", target, Hot(key, hits, (key,), text, chat))


def report(local: int, loaded: int, loadable: int) -> WarmReport:
    return WarmReport(local_tokens=local, loaded_tokens=loaded, loadable_tokens=loadable)


def test_chat_prefixes_are_not_warmed_by_completion() -> None:
    hp = HotPrefixes(BS, min_hits=2)
    for prompt, chat in (("c" * 64, False), ("c" * 64 + "tail", False), ("m" * 64, True), ("m" * 64, True)):
        hashes = block_hashes(prompt, BS)
        hp.observe(hashes[1], 2, hashes, prompt, chat)
    hot = {h.text[:1]: h for h in hp.hot(10)}
    assert not hot["c"].chat and hot["m"].chat
    moves = [Move("a", "b", hot["c"]), Move("a", "b", hot["m"]), Move("a", "c", hot["m"]), move(9, text="")]
    keep, left_out = warmable(moves)
    assert keep == [moves[0]] and left_out == 2   # the chat prefix (two moves) and the one without text


def test_warm_body_asks_one_greedy_token_and_the_report() -> None:
    body = warm_body("tiny", "abc")
    assert body["prompt"] == "abc" and body["max_tokens"] == 1 and body["stream"] is False
    assert body["kv_transfer_params"] == {WARM_REPORT: True}


def test_connector_reports_what_it_matched_and_what_it_could_have() -> None:
    p = BlockPlanner(BS)
    hashes = [bytes([i]) * 8 for i in range(5)]
    # 22 prompt tokens: 5 loadable blocks; 1 block local, store holds blocks 0-3.
    n = p.matched("r", 22, hashes, local_tokens=BS, present=[True, True, True, True, False])
    p.allocated("r", hashes, list(range(6)), external_tokens=n or 0)
    got = warm_answer(p.finished("r"), 22, BS, len(hashes))
    assert (got.local_tokens, got.loaded_tokens, got.loadable_tokens) == (BS, 3 * BS, 5 * BS)
    assert not got.held()                       # block 4 was computed
    # The wire form round-trips through the router's parser; a response without it is no report.
    assert warm_report(got.wire()) == got
    assert warm_report({"do_remote_prefill": True}) is None and warm_report(None) is None
    assert warm_report({"kvpilot_loaded_tokens": -1}) is None
    # A request the connector never matched (finished before scheduling) reports nothing held.
    assert warm_answer(None, 22, BS, 5).wire() == {"kvpilot_local_tokens": 0, "kvpilot_loaded_tokens": 0,
                                                   "kvpilot_loadable_tokens": 20}
    assert warm_answer(None, 3, BS, 0).held()   # shorter than a block: nothing to load, nothing missing


def test_tally_counts_prefixes_held_and_tokens_loaded() -> None:
    a, b, c = move(1), move(2, "c"), move(3)
    out, answered = tally([(a, report(0, 256, 256)), (b, report(128, 128, 256)), (c, report(0, 0, 256))])
    # c's target computed its prefix (the store had none of it): partial, c not counted as moved.
    assert (out.outcome, out.prefixes, out.tokens) == ("partial", 2, 384)
    assert "0/256" in out.detail and answered == [a, b, c]   # all three hold their prefix now
    out, answered = tally([(a, report(0, 0, 256)), (b, OSError("refused"))])
    assert (out.outcome, out.prefixes, out.tokens) == ("failed", 0, 0) and answered == [a]
    assert "refused" in out.detail
    out, _ = tally([(a, report(256, 0, 256))])          # already cached there: held, nothing loaded
    assert (out.outcome, out.prefixes, out.tokens) == ("ok", 1, 0)
    out, answered = tally([(a, None), (b, None)])
    assert out.outcome == "unsupported" and answered == []
    # Rounds combine as the export/import path's: tokens add up.
    parts = [tally([(a, report(0, 256, 256))])[0], tally([(b, report(0, 0, 256))])[0]]
    assert (combine(parts).outcome, combine(parts).tokens) == ("partial", 256)
    assert [len(r) for r in batches([move(k, hits=10 - k) for k in range(5)], 2)] == [2, 2, 1]


def test_shared_store_only_for_vllm_with_redis() -> None:
    def cfg(**kw: object) -> ModelConfig:
        return ModelConfig.model_validate({"name": "m", **kw})

    assert cfg(engine="vllm", kvTransfer={"backend": "redis"}).shared_store()
    assert not cfg(engine="vllm", kvTransfer={"backend": "nixl"}).shared_store()
    assert not cfg(engine="vllm").shared_store()
    assert not cfg(kvTransfer={"backend": "redis"}).shared_store()   # simulator: export/import
