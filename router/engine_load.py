"""Active-active router replicas: each one's load view adds the engines' own counts to its own work.

Several router replicas serve one model behind one Service, with no shared state. They agree on
placement without talking: every replica builds the same rings from the same membership, so a
prefix maps to the same instances whichever replica a request reaches. What they cannot agree on
without help is load: each replica counts only what it dispatched itself, so three replicas that
each see an idle instance would all send their next request there. So each replica polls every
engine's own counts (vLLM's `num_requests_running` / `num_requests_waiting` and KV usage, at
`scrapeIntervalSeconds`) and attributes to its peers whatever the engine reports beyond its own:

- at a poll, peers' requests = the engine's count − this replica's requests in flight there at
  that moment (never negative: a request this replica sent may not have reached the engine yet);
- between polls the peers' share is held and this replica's own count moves with every dispatch,
  so the combined view (`total_in_flight`) is peers-at-the-poll + own-now.

Peers' requests waiting for their prefill count as work ahead of a new request; the router knows
their number, not their size, so the estimator prices each at its own mean prefill work per
request (`LoadEstimator.external`). The peers' waiting share is a lower bound: this replica's
unstarted requests include ones the engine is already prefilling (running, not waiting). Where
the engine also reports the prompt tokens of its requests before their first token (the
simulator's `kvpilot:pending_prompt_tokens`; vLLM has no such gauge), the peers' prefill work is
that less this replica's own, priced at its own ratio of prefill work to prompt tokens: in the
virtual-time cluster this is what brings three replicas' SLO attainment back to one's
(bench/results/router_replicas.md).
With one replica both peer counts stay near zero and nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from kvpilot.router.policy import InstanceLoad

PENDING_PROMPT_TOKENS = "kvpilot:pending_prompt_tokens"
PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES = "vllm:prefix_cache_hits", "vllm:prefix_cache_queries"
# vLLM's engine settings as labels of one gauge; its `block_size` is what a resume's cut aligns to.
CACHE_CONFIG = "vllm:cache_config_info"
# What a poll reads; a vLLM /metrics page is ~200 lines of histograms besides these few.
_READ = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
         PENDING_PROMPT_TOKENS, PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES, CACHE_CONFIG)
_READ_LINES = _READ + tuple(f"# {kind} {name}" for kind in ("HELP", "TYPE") for name in _READ)


@dataclass(frozen=True, slots=True)
class EngineSample:
    """One poll of an engine's own load (vLLM's metric names)."""

    running: int        # vllm:num_requests_running
    waiting: int        # vllm:num_requests_waiting
    kv_usage: float     # vllm:kv_cache_usage_perc, 0-1
    # Prompt tokens of the requests before their first token (PENDING_PROMPT_TOKENS): the size of
    # the prefill work queued there. The simulator exports it; vLLM does not (None).
    prompt_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class EnginePage:
    """What one poll of an engine's /metrics read: its load, and its prefix-cache counters (in
    tokens, summed over its engines) when it exports them."""

    sample: EngineSample
    cache_hits: float | None = None
    cache_queries: float | None = None
    block_size: int | None = None   # the engine's KV block size (vLLM's cache_config_info), when it says


def read_metrics(text: str, before: EngineSample) -> EnginePage:
    """Parse the few families a poll needs out of an engine's /metrics page; a family the page
    lacks keeps its value from `before`.

    Only those families' lines reach prometheus_client's parser: parsing the whole page cost the
    router 8-10 ms of CPU per engine and poll (measured on a simulator's 185-line page), i.e. a
    quarter of a core at 8 engines polled every 250 ms; the filtered page costs 0.5 ms."""
    lines = "\n".join(line for line in text.split("\n") if line.startswith(_READ_LINES))
    running, waiting, kv_usage, prompt_tokens = before.running, before.waiting, before.kv_usage, None
    hits = queries = block_size = None
    for family in text_string_to_metric_families(lines):
        values = [s.value for s in family.samples]
        if family.name == "vllm:num_requests_running":
            running = int(sum(values))
        elif family.name == "vllm:num_requests_waiting":
            waiting = int(sum(values))
        elif family.name == "vllm:kv_cache_usage_perc":
            kv_usage = max(values, default=0.0)
        elif family.name == PENDING_PROMPT_TOKENS:
            prompt_tokens = int(sum(values))
        elif family.name in (PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES):
            total = sum(s.value for s in family.samples if s.name.endswith("_total"))
            if family.name == PREFIX_CACHE_HITS:
                hits = total
            else:
                queries = total
        elif family.name == CACHE_CONFIG:
            sizes = {s.labels.get("block_size", "") for s in family.samples}
            if len(sizes) == 1 and (size := sizes.pop()).isdigit() and int(size) > 0:
                block_size = int(size)
    return EnginePage(EngineSample(running, waiting, kv_usage, prompt_tokens), hits, queries, block_size)


def peer_share(sample: EngineSample, own_in_flight: int, own_unstarted: int) -> tuple[int, int]:
    """(peers' requests at the engine, peers' requests waiting for their prefill), from a poll and
    this replica's own counts at that moment."""
    peers = max(0, sample.running + sample.waiting - own_in_flight)
    return peers, min(peers, max(0, sample.waiting - own_unstarted))


def observe(load: InstanceLoad, sample: EngineSample) -> None:
    """Take one poll into an instance's load view: the engine's counts as reported, and the peers'
    share against this replica's own requests now (call it when the poll's answer arrives)."""
    load.engine_running, load.engine_waiting, load.kv_usage = sample.running, sample.waiting, sample.kv_usage
    load.peer_in_flight, load.peer_waiting = peer_share(sample, load.in_flight, load.pending_prefill)
    load.peer_prompt_tokens = (None if sample.prompt_tokens is None
                               else max(0, sample.prompt_tokens - load.pending_prefill_tokens))


def forget(load: InstanceLoad) -> None:
    """The engine could not be polled: drop what was attributed to peers there (a stale share would
    keep this replica off an instance that may have drained)."""
    load.peer_in_flight = load.peer_waiting = 0
    load.peer_prompt_tokens = None


def total_in_flight(load: InstanceLoad) -> int:
    """Requests at the instance from every replica: peers' at the last poll plus this one's now."""
    return load.in_flight + load.peer_in_flight
