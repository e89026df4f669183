"""What each vLLM instance really holds in its prefix cache, from its own KV-cache events.

vLLM (with `--kv-events-config`) publishes `BlockStored` / `BlockRemoved` / `AllBlocksCleared`
batches over ZMQ. The router binds one SUB socket; each instance dials in (a plain `tcp://host:port`
endpoint makes vLLM connect) and publishes under its own topic, which must be its endpoint name
(on Kubernetes: the pod name, `--kv-events-config '{..."topic":"$(POD_NAME)"}'`).

The engine's block hashes are sha256 digests of its own token ids, which the router cannot compute
without the model's tokenizer and vLLM's hashing scheme. Instead the index keys every block by a
router-side chained hash over the block's token ids, which `BlockStored` carries: the router then
needs only the tokenizer (`tokenizers`, one file) to key a prompt the same way, and never depends
on vLLM's hash function or seed. `cached_tokens` answers the policies' question "how many leading
prompt tokens does this instance hold" (`kvpilot.router.estimate.CacheView`). A chat request's
prompt is built by the engine from the model's chat template; the router renders the same
template (`ChatTemplate`) so chats are keyed too. The router always passes a message's content as
one string (text parts joined by newlines, as vLLM does for most templates). A template that vLLM
detects as iterating over content parts gets a list from vLLM instead, so it may render
differently here: its chats' keys then match no cached blocks, as if nothing were cached.

Wire format (vLLM 0.32, msgspec): frames `[topic, seq(8 bytes BE), msgpack([ts, [event…], dp_rank])]`,
each event a map tagged by `type` (older builds wrote `[tag, field…]` arrays; both are read).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from xxhash import xxh3_64_intdigest

from kvpilot.router.policy import RequestView
from kvpilot.tokens import ROOT_HASH

log = logging.getLogger("kvpilot.router.kv_events")


def token_block_keys(token_ids: Sequence[int], block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """Chained keys of the full blocks of `token_ids` (a trailing partial block is not cached):
    XXH3 of each block's ids as 4-byte little-endian integers, seeded with the parent's key. Only
    the router computes these keys (from events and from prompts alike), so they need not match
    any hash of vLLM's; they run on every request, so they are packed once per prompt and hashed
    without a cryptographic hash (32k tokens in 16-token blocks: 5.3 ms before, ≈ 0.5 ms now)."""
    packed = array("I", token_ids)   # 4-byte unsigned on every platform CPython supports
    if sys.byteorder != "little":
        packed.byteswap()
    data, step = packed.tobytes(), 4 * block_size
    out: list[int] = []
    for i in range(len(token_ids) // block_size):
        parent = xxh3_64_intdigest(data[i * step : (i + 1) * step], parent)
        out.append(parent)
    return out


@dataclass(slots=True)
class BlockIndex:
    """One instance's cached blocks: engine hash → router key, and the multiset of keys."""

    by_engine: dict[int | bytes, int] = field(default_factory=dict)
    keys: Counter[int] = field(default_factory=Counter)
    last_seq: int = -1

    def stored(self, hashes: Sequence[int | bytes], parent: int | bytes | None, token_ids: Sequence[int],
               block_size: int) -> None:
        if parent is None:
            key = ROOT_HASH
        elif parent in self.by_engine:
            key = self.by_engine[parent]
        else:
            return  # the parent's event was lost (published before we listened): unknown chain
        for h, k in zip(hashes, token_block_keys(token_ids, block_size, key), strict=False):
            if h not in self.by_engine:
                self.by_engine[h] = k
                self.keys[k] += 1

    def removed(self, hashes: Iterable[int | bytes]) -> None:
        for h in hashes:
            k = self.by_engine.pop(h, None)
            if k is not None:
                self.keys[k] -= 1
                if self.keys[k] <= 0:
                    del self.keys[k]

    def cleared(self) -> None:
        self.by_engine.clear()
        self.keys.clear()

    def match(self, keys: Sequence[int]) -> int:
        """Leading blocks of `keys` held here, by binary search: O(log n) lookups, where a scan of a
        32k-token prompt's 2,000 GPU blocks took ≈ 90 µs per candidate instead of 1-2 µs. It relies
        on held blocks forming a prefix of every prompt, which vLLM's eviction keeps: a request
        frees its blocks tail first and a hit refreshes a whole prefix, so a block is never evicted
        before a block that follows it."""
        held = self.keys
        if not keys or keys[0] not in held:
            return 0
        lo, hi = 1, len(keys)   # keys[:lo] held, keys[hi:] not
        while lo < hi:
            mid = (lo + hi) // 2
            if keys[mid] in held:
                lo = mid + 1
            else:
                hi = mid
        return lo


def _fields(event: Any) -> tuple[str, dict[str, Any]]:
    """(type, fields) of one event, whether msgspec wrote it as a tagged array or a map."""
    if isinstance(event, dict):
        return str(event.get("type", "")), event
    if isinstance(event, list | tuple) and event:
        tag, rest = str(event[0]), list(event[1:])
        names = {"BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size"),
                 "BlockRemoved": ("block_hashes",)}.get(tag, ())
        return tag, dict(zip(names, rest, strict=False))
    return "", {}


class KVEventIndex:
    """Per-instance block indexes fed by KV events, and the prompt → keys function that matches them."""

    def __init__(self, block_size: int = 128, tokenizer: Any = None, chat_template: ChatTemplate | None = None,
                 replay_address: Callable[[str], str | None] | None = None, replay_timeout_s: float = 5.0) -> None:
        self.block_size = block_size
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer`; None: only events, no prompt matching
        self.chat_template = chat_template   # None: chat requests are not matched against events
        self.instances: dict[str, BlockIndex] = {}
        self.batches = 0
        # Instance name → its replay socket (vLLM `replay_endpoint`), None where it has none.
        self.replay_address = replay_address
        self.replay_timeout_s = replay_timeout_s
        self.replays: Counter[str] = Counter()              # outcome → count
        self.on_replay: Callable[[str, str], None] | None = None   # (instance, outcome): a metric
        self._held: dict[str, list[tuple[int, Any]]] = {}    # live batches of an instance being replayed

    def apply(self, name: str, seq: int, payload: Any) -> None:
        """One decoded batch `[ts, events, dp_rank]` from instance `name`."""
        index = self.instances.setdefault(name, BlockIndex())
        if seq <= index.last_seq:  # the engine restarted (seq starts from 0): its cache is empty
            index.cleared()
        index.last_seq = seq
        self.batches += 1
        for event in payload[1]:
            kind, f = _fields(event)
            if kind == "BlockStored":
                index.stored(f["block_hashes"], f.get("parent_block_hash"), f["token_ids"],
                             int(f.get("block_size") or self.block_size))
            elif kind == "BlockRemoved":
                index.removed(f["block_hashes"])
            elif kind == "AllBlocksCleared":
                index.cleared()

    def prompt_keys(self, prompt: str) -> tuple[int, ...]:
        if self.tokenizer is None:
            return ()
        return tuple(token_block_keys(self.tokenizer.encode(prompt).ids, self.block_size))

    def chat_keys(self, messages: Any) -> tuple[int, ...]:
        """Keys of a chat request's prompt as the engine builds it: the model's own chat template,
        then its tokenizer without added special tokens (the template writes them), as vLLM does.
        Empty when the model has no template or the messages do not render."""
        if self.tokenizer is None or self.chat_template is None:
            return ()
        try:
            text = self.chat_template.render(messages)
        except Exception as e:   # a template error means no cache view, not a failed request
            log.debug("chat template did not render: %s", e)
            return ()
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return tuple(token_block_keys(ids, self.block_size))

    def cached_tokens(self, name: str, request: RequestView) -> int | None:
        """Leading prompt tokens `name` holds, or None when the router cannot tell (no keys)."""
        if not request.engine_blocks:
            return None
        index = self.instances.get(name)
        return 0 if index is None else index.match(request.engine_blocks) * self.block_size

    def summary(self) -> dict[str, int]:
        return {name: len(index.by_engine) for name, index in self.instances.items()}

    def receive(self, name: str, seq: int, payload: Any) -> int | None:
        """One live batch. Returns the sequence number to replay from when batches before it were
        missed (a router that started after the engine, or lost messages) and the instance has a
        replay socket; the batch is then held until `replayed`."""
        held = self._held.get(name)
        if held is not None:
            held.append((seq, payload))
            return None
        index = self.instances.get(name)
        start = 0 if index is None else index.last_seq + 1
        if seq > start and self.replay_address is not None and self.replay_address(name):
            self._held[name] = [(seq, payload)]
            return start
        self.apply(name, seq, payload)
        return None

    def replayed(self, name: str, batches: list[tuple[int, Any]], outcome: str) -> None:
        """Apply what a replay returned, then the live batches held meanwhile, each once in order."""
        self.replays[outcome] += 1
        if self.on_replay is not None:
            self.on_replay(name, outcome)
        held = self._held.pop(name, [])
        index = self.instances.setdefault(name, BlockIndex())
        for seq, payload in [*batches, *held]:
            if seq > index.last_seq:   # the replay and the live stream overlap: skip what was applied
                self.apply(name, seq, payload)

    async def replay(self, ctx: Any, name: str, address: str, start: int) -> None:
        """Fetch `name`'s buffered batches from `start` over its replay socket (a DEALER to vLLM's
        ROUTER: send the start sequence, read batches until the end marker, sequence -1)."""
        import msgpack
        import zmq

        batches: list[tuple[int, Any]] = []
        outcome = "error"   # until the end marker arrives; the held live batches are applied whatever happens
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.connect(address)
            await sock.send_multipart([b"", start.to_bytes(8, "big", signed=True)])
            while True:
                if not await sock.poll(self.replay_timeout_s * 1000):
                    outcome = "timeout"
                    break
                frames = await sock.recv_multipart()
                if len(frames) != 4:
                    continue
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq < 0:
                    outcome = "ok"
                    break
                batches.append((seq, msgpack.unpackb(frames[3])))
        except (zmq.ZMQError, ValueError) as e:
            log.warning("KV-event replay from %s failed: %s", address, e, extra={"endpoint": name})
        finally:
            sock.close(linger=0)
            log.info("KV-event replay from seq %d: %s, %d batches", start, outcome, len(batches),
                     extra={"endpoint": name})
            self.replayed(name, batches, outcome)

    async def listen(self, endpoint: str) -> None:
        """Bind a SUB socket at `endpoint` and apply batches until cancelled; fetch missed batches
        from an instance's replay socket when its sequence jumps."""
        import asyncio

        import msgpack
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:  # the router still routes, on its shadow estimate
            log.error("cannot listen for KV events on %s: %s", endpoint, e)
            sock.close(linger=0)
            ctx.term()
            return
        log.info("listening for KV events", extra={"endpoint": endpoint})
        replays: set[asyncio.Task[None]] = set()
        try:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) != 3:
                    continue
                topic, seq, payload = frames
                name = topic.decode(errors="replace")
                try:
                    start = self.receive(name, int.from_bytes(seq, "big", signed=True), msgpack.unpackb(payload))
                except (ValueError, KeyError, TypeError, IndexError) as e:
                    log.warning("bad KV event batch: %s", e, extra={"endpoint": name})
                    continue
                address = self.replay_address(name) if start is not None and self.replay_address else None
                if start is not None and address:
                    task = asyncio.create_task(self.replay(ctx, name, address, start))
                    replays.add(task)
                    task.add_done_callback(replays.discard)
        finally:
            for task in replays:
                task.cancel()
            with contextlib.suppress(Exception):
                sock.close(linger=0)
            ctx.term()


class ChatTemplate:
    """A Hugging Face chat template rendered as `transformers`' `apply_chat_template` renders it
    (a sandboxed Jinja environment, trimmed blocks, the tokenizer's special tokens as variables,
    the assistant's turn opened), so the router's prompt text is the engine's, token for token."""

    def __init__(self, source: str, special: dict[str, str]) -> None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
                   separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson   # not Jinja's HTML-escaping one
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.special = special

    def render(self, messages: Any) -> str:
        if not isinstance(messages, list):
            raise ValueError("messages must be a list")
        conversation = []
        for m in messages:
            content = m.get("content", "")
            if isinstance(content, list):   # OpenAI content parts: vLLM joins the text ones with newlines
                content = "\n".join(str(p.get("text", "")) for p in content
                                    if isinstance(p, dict) and p.get("type") == "text")
            conversation.append({**m, "content": content})
        return str(self.template.render(messages=conversation, add_generation_prompt=True, **self.special))


HUB = "hf://"   # a tokenizer source on the Hugging Face hub: hf://org/name


def _model_file(source: str, filename: str) -> str | None:
    """A file of a model directory, or of a hub repository (downloaded, and cached by
    huggingface_hub); None when the model has no such file."""
    from pathlib import Path

    if source.startswith(HUB):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return str(hf_hub_download(source.removeprefix(HUB), filename))
        except EntryNotFoundError:
            return None
    path = Path(source) / filename
    return str(path) if path.is_file() else None


def load_chat_template(source: str) -> ChatTemplate | None:
    """The chat template of a model directory or hub repository (`chat_template.jinja`, or
    `chat_template` in `tokenizer_config.json`), with its special tokens; None when it has none."""
    from pathlib import Path

    if not source.startswith(HUB) and not Path(source).is_dir():
        return None
    config_file = _model_file(source, "tokenizer_config.json")
    config: dict[str, Any] = json.loads(Path(config_file).read_text()) if config_file else {}
    template = config.get("chat_template")
    if isinstance(template, list):   # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja_file = _model_file(source, "chat_template.jinja")
    if jinja_file:
        template = Path(jinja_file).read_text()
    if not isinstance(template, str):
        return None
    special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    return ChatTemplate(template, special)


def load_tokenizer(source: str) -> Any:
    """A `tokenizers.Tokenizer` from a tokenizer.json file, a model directory holding one, or a
    hub repository (`hf://org/name`)."""
    from pathlib import Path

    from tokenizers import Tokenizer

    if source.startswith(HUB):   # through huggingface_hub: its cache, HF_TOKEN and HF_HUB_OFFLINE apply
        path = _model_file(source, "tokenizer.json")
        if path is None:
            raise FileNotFoundError(f"{source} has no tokenizer.json")
        return Tokenizer.from_file(path)
    p = Path(source)
    return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))



