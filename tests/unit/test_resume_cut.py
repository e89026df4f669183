"""Where a move by resume cuts (router/resume_cut.py), where the block size comes from (the config or
the engine's own /metrics), and the target's bounded wait for the source's last block
(kvtransfer/vllm_blocks.py, kvtransfer/protocol.py)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from pydantic import ValidationError

from kvpilot.kvtransfer.protocol import RESUME_BLOCKS, RESUME_WAIT_S, resume_wait
from kvpilot.kvtransfer.vllm_blocks import BlockPlanner
from kvpilot.router.config import Endpoint
from kvpilot.router.engine_load import EngineSample, read_metrics
from kvpilot.router.metrics import RouterMetrics
from kvpilot.router.migration import Migrator
from kvpilot.router.migration_policy import MigrationConfig
from kvpilot.router.policy import InstanceLoad
from kvpilot.router.pool import Member
from kvpilot.router.resume_cut import CutAlign, load_params, pre_copy_body, tail_tokens, tokens_to_wait

CPU = CutAlign(block_size=128, slack=1, max_wait=128)


def test_the_tail_is_what_follows_the_last_full_block_below_the_last_token() -> None:
    assert tail_tokens(2048 + 40, 128) == 40
    assert tail_tokens(2049, 128) == 1        # just past a boundary: the last token only
    assert tail_tokens(2048, 128) == 128      # exactly on one: a whole block (the last token is never loaded)
    assert tail_tokens(1, 128) == 1


@pytest.mark.parametrize("slack", [0, 1, 3])
@pytest.mark.parametrize("block_size", [16, 128])
def test_waiting_lands_every_cut_at_one_plus_slack_past_a_boundary(block_size: int, slack: int) -> None:
    align = CutAlign(block_size, slack, max_wait=block_size)
    for n in range(1, 4 * block_size):
        wait = tokens_to_wait(n, align, left=None)
        assert 0 <= wait < block_size
        assert tail_tokens(n + wait, block_size) <= 1 + slack, (n, wait)
        if tail_tokens(n, block_size) <= 1 + slack:
            assert wait == 0, n                 # already there: no wait at all


def test_the_2k_bench_cut_waits_for_the_next_boundary() -> None:
    # 2048-token prompt, 40 generated: 90 more tokens reach 17 blocks + 2.
    assert tokens_to_wait(2088, CPU, left=160) == 90
    assert tail_tokens(2088 + 90, 128) == 2


def test_a_cut_too_far_away_or_past_the_requests_end_is_taken_at_once() -> None:
    assert tokens_to_wait(2088, CutAlign(128, 1, max_wait=89), left=None) == 0     # the bound
    assert tokens_to_wait(2088, CutAlign(128, 1, max_wait=90), left=None) == 90
    assert tokens_to_wait(2088, CPU, left=90) == 0      # it would have no token left for the target
    assert tokens_to_wait(2088, CPU, left=91) == 90     # one left: still worth it
    assert tokens_to_wait(2088, CutAlign(128, 1, max_wait=0), left=None) == 0      # alignment off


def test_a_slack_of_a_block_or_more_is_clipped_to_one_less() -> None:
    align = CutAlign(16, slack=40, max_wait=16)
    assert all(tokens_to_wait(n, align, None) == 0 for n in range(1, 64))


def test_the_continuation_asks_the_target_to_wait_for_every_loadable_block() -> None:
    params = load_params(2178, CutAlign(128, 1, 128, load_wait_s=0.05))
    assert params == {RESUME_BLOCKS: 17, RESUME_WAIT_S: 0.05}
    assert resume_wait(params) == (17, 0.05)
    assert resume_wait(None) == (0, 0.0)
    assert resume_wait({"do_remote_prefill": True}) == (0, 0.0)
    assert resume_wait({RESUME_BLOCKS: "x", RESUME_WAIT_S: 1}) == (0, 0.0)
    assert resume_wait({RESUME_BLOCKS: 3, RESUME_WAIT_S: 0}) == (0, 0.0)


def test_a_pre_copy_takes_every_full_block_so_far_and_computes_one_token() -> None:
    align = CutAlign(128, 1, 128, load_wait_s=0.05, pre_copy=True)
    ids = list(range(2088))
    body = pre_copy_body("tiny", ids, align)
    assert body is not None and body["prompt"] == ids[:16 * 128 + 1] and body["max_tokens"] == 1
    assert body["kv_transfer_params"] == {RESUME_BLOCKS: 16, RESUME_WAIT_S: 0.05}
    assert tail_tokens(len(body["prompt"]), 128) == 1
    assert pre_copy_body("tiny", ids[:128], align) is None      # not one loadable block yet


def test_the_target_waits_for_the_sources_last_block_at_most_its_bound() -> None:
    hashes = [bytes([i]) * 8 for i in range(4)]
    p = BlockPlanner(4, pd_wait_s=10.0)
    args = ("r", 14, hashes[:3])
    assert p.matched(*args, local_tokens=0, present=[True, True, False], expected_blocks=3, now=5.0,
                     wait_s=0.05) is None
    assert p.matched(*args, local_tokens=0, present=[True, True, True], expected_blocks=3, now=5.01,
                     wait_s=0.05) == 12
    q = BlockPlanner(4, pd_wait_s=10.0)    # the resume's bound, not the P/D one, ends the wait
    assert q.matched(*args, local_tokens=0, present=[True, True, False], expected_blocks=3, now=5.0,
                     wait_s=0.05) is None
    assert q.matched(*args, local_tokens=0, present=[True, True, False], expected_blocks=3, now=5.06,
                     wait_s=0.05) == 8


def _cache_config_page(block_size: str | None) -> str:
    """What vLLM's /metrics says of its CacheConfig: a gauge set to 1, the settings as labels."""
    reg = CollectorRegistry()
    if block_size is not None:
        Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
              ["block_size", "cache_dtype", "engine"], registry=reg).labels(block_size, "auto", "0").set(1)
    Gauge("vllm:num_requests_running", "running", registry=reg).set(2)
    return generate_latest(reg).decode()


def test_the_engines_block_size_is_read_from_its_cache_config_info() -> None:
    assert read_metrics(_cache_config_page("128"), EngineSample(0, 0, 0.0)).block_size == 128
    assert read_metrics(_cache_config_page("16"), EngineSample(0, 0, 0.0)).block_size == 16
    assert read_metrics(_cache_config_page(None), EngineSample(0, 0, 0.0)).block_size is None   # the simulator
    assert read_metrics(_cache_config_page("None"), EngineSample(0, 0, 0.0)).block_size is None


def test_the_config_validates_and_names_the_alignment_fields() -> None:
    cfg = MigrationConfig.model_validate({"alignCutTokens": 64, "cutSlackTokens": 2, "blockSize": 16,
                                          "resumeLoadWaitSeconds": 0.02})
    assert (cfg.align_cut_tokens, cfg.cut_slack_tokens, cfg.block_size, cfg.resume_load_wait_s) == (64, 2, 16, 0.02)
    with pytest.raises(ValidationError, match="cutSlackTokens"):
        MigrationConfig.model_validate({"cutSlackTokens": 16, "blockSize": 16})
    with pytest.raises(ValidationError):
        MigrationConfig.model_validate({"alignCutTokens": -1})


def _member(name: str, block_size: int | None) -> Member:
    return Member(Endpoint(name=name, url="http://127.0.0.1:1"), InstanceLoad(name, kv_block_size=block_size))


def test_the_block_size_is_the_configs_or_the_engines_own_and_else_no_alignment() -> None:
    def align(cfg: dict[str, object], a: int | None, b: int | None) -> CutAlign | None:
        m = Migrator(RouterMetrics())
        m.add_model("m", None, MigrationConfig.model_validate(cfg), 2.0, engine="vllm")  # type: ignore[arg-type]
        return m._align("m", _member("a", a), _member("b", b))

    assert align({}, 128, 128) == CutAlign(128, 1, 128, 0.05)
    assert align({"blockSize": 16, "preCopy": True}, None, None) == CutAlign(16, 1, 128, 0.05, pre_copy=True)
    assert align({}, None, None) is None             # nobody knows it: cut at once, as before
    assert align({}, 128, 16) is None                # the engines disagree: they share no blocks
    assert align({"alignCutTokens": 0}, 128, 128) is None
