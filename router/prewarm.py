"""Scale-event handover for vLLM engines sharing kvpilot's Redis store: warm the pod, export nothing.

Engines running `KvpilotRedisConnector` save every full block they compute to one shared store,
so a leaving pod's hot prefixes are already there when it goes, and the current owners' are there
for a joining pod. What the pod that inherits a prefix lacks is those blocks in its own prefix
cache: without a handover its first request of the prefix loads them (and waits for the load).
The router warms it ahead of that by sending each hot prefix as an ordinary 1-token completion
(`warm_body`): vLLM asks the connector, which loads the stored blocks into the pod's prefix cache,
and the response's `kv_transfer_params` carry a `protocol.WarmReport` saying how many tokens came
from the pod's cache, from the store, and how many could have. `tally` turns the reports into the
handover's outcome. Pure: `kvpilot.router.handover` sends the requests.

Only prefixes seen as completions are warmed: the router keys a chat by kvpilot's rendering of its
messages, not by the model's chat template, so a completion of that text would not share the
engine's blocks. A chat prefix's new owner still loads it from the store on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvpilot.kvtransfer.protocol import WARM_REPORT, WarmReport
from kvpilot.router.hot_prefixes import Move, Outcome

Result = WarmReport | BaseException | None   # the report, the request's failure, or no report


def warmable(moves: Sequence[Move]) -> tuple[list[Move], int]:
    """The moves a completion can warm, and how many prefixes were left out (chats, no text)."""
    keep = [mv for mv in moves if mv.prefix.text and not mv.prefix.chat]
    return keep, len({mv.prefix.key for mv in moves} - {mv.prefix.key for mv in keep})


def warm_body(model: str, text: str) -> dict[str, Any]:
    """The completion that makes a pod load `text`'s stored blocks: one greedy token, a report."""
    return {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0, "stream": False,
            "kv_transfer_params": {WARM_REPORT: True}}


def tally(results: Sequence[tuple[Move, Result]]) -> tuple[Outcome, list[Move]]:
    """One round's outcome, and the moves whose target answered (it holds the prefix now, loaded
    or computed). A prefix counts as handed over when its target holds every full block without
    having computed one (`WarmReport.held`); `tokens` are the ones loaded from the store.
    Unsupported when no target reports (an engine without kvpilot's connector); failed when no
    prefix came over (the store down or evicted: the targets computed them); partial between."""
    if results and all(r is None for _, r in results):
        return Outcome("unsupported", detail="the engines answer without kvpilot's connector report"), []
    out = Outcome("ok")
    problems: list[str] = []
    for mv, r in results:
        if isinstance(r, WarmReport):
            out.tokens += r.loaded_tokens
            if r.held():
                out.prefixes += 1
                continue
            problems.append(f"{mv.target}: {r.local_tokens + r.loaded_tokens}/{r.loadable_tokens} tokens "
                            "from its cache or the store, the rest computed")
        elif r is None:
            problems.append(f"{mv.target}: no report")
        else:
            problems.append(f"{mv.target}: {r or type(r).__name__}")
    if problems:
        out.outcome = "partial" if out.prefixes else "failed"
        out.detail = "; ".join(problems[:4]) + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")
    return out, [mv for mv, r in results if not isinstance(r, BaseException)]
