"""The engine model: vLLM's scheduler and KV cache in pure Python, with no I/O and no clock.

Both drivers use it: the real-time server (`kvpilot.sim.server`) sleeps for each step's
duration, the virtual-time cluster (`kvpilot.sim.cluster`) jumps its clock. One model, so a
benchmark at 1,000 instances and a test against live workers see the same behaviour.

Scheduling follows vLLM v1: one token budget per step shared by running requests first (a
decode costs one token, a prefill chunk what is left of the budget), then waiting requests in
FCFS order; no new admissions in a step that had to preempt. Decode and prefill are one rule:
a request computes KV for `num_tokens - computed` tokens, and when it has caught up it samples
one token. Preemption is by recompute: the youngest running request loses its blocks and goes
back to the head of the queue.

A CPU engine whose API server shares its core (`Profile.frontend_shares_core`) serializes the
two: a request that arrived during a step has its front-end work (HTTP, tokenization:
`frontend_s`) done on that core before the next step's forward pass, which it then joins; that
step takes longer by the work, and by `busy_frontend_s` more when requests were already running
(a request that finds the engine decoding waits longer than one that finds it idle, beyond the
step it joins: bench/results/sim_fidelity.md). (Deferring the request one more step, as if the
work overlapped the step after, over-predicted the real engine's TTFT by 37-47% at 6 req/s.)

A CPU engine also pays `Profile.new_shape_s` (+ `new_shape_token_s` per token) on a step whose
batched token count is not among the last `shape_cache_size` distinct counts it ran (oneDNN builds
GEMM kernels per size and keeps a bounded cache of them; bench/results/sim_fidelity.md); `shapes`
holds those counts, oldest first.

Virtual time adds one thing: a step that only decodes, with nobody admissible waiting, is
repeated until the first request finishes, in closed form (`StepPlan.steps` > 1). A driver
that learns of an arrival mid-way truncates the plan to the steps done by then, so the result
equals single-stepping.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

from kvpilot.sim.blocks import BlockPool
from kvpilot.sim.profiles import Profile
from kvpilot.sim.sequence import EngineCounters, Phase, Sequence, StepPlan


class Engine:
    def __init__(self, profile: Profile, *, block_size: int | None = None, kv_capacity_tokens: int | None = None,
                 max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                 record_events: bool = False) -> None:
        self.profile = profile
        self.block_size = block_size or profile.block_size
        capacity = kv_capacity_tokens or profile.kv_capacity_tokens
        self.pool = BlockPool(max(1, capacity // self.block_size), record_events=record_events)
        self.max_num_seqs = max_num_seqs or profile.max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens or profile.max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.frontend: list[Sequence] = []   # arrived, front-end work not started (frontend_shares_core)
        self.counters = EngineCounters()
        self.shapes: OrderedDict[int, None] = OrderedDict()   # step token counts with kernels built (new_shape_s)
        self._shapes_on = profile.new_shape_s > 0 or profile.new_shape_token_s > 0   # off: no bookkeeping per step

    # -- requests ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.prompt_tokens <= 0:
            raise ValueError("a request needs at least one prompt token")
        if seq.max_tokens <= 0:
            raise ValueError("max_tokens must be positive")
        if self._blocks_for(seq.prompt_tokens + 1) > self.pool.num_blocks:
            raise ValueError(f"prompt of {seq.prompt_tokens} tokens exceeds the KV cache "
                             f"({self.pool.num_blocks * self.block_size} tokens)")
        (self.frontend if self.profile.frontend_shares_core else self.waiting).append(seq)

    def frontend_s(self, seq: Sequence) -> float:
        """The API server's CPU time for one new request (fixed + tokenizing the prompt)."""
        p = self.profile
        return p.request_overhead_s + p.frontend_token_s * seq.prompt_tokens

    def abort(self, seq: Sequence) -> None:
        """Drop a request wherever it is (client went away); frees its blocks."""
        if seq.finished:
            return
        if seq.phase == Phase.RUNNING or seq.phase == Phase.PAUSED:
            if seq.phase == Phase.RUNNING:
                self.running.remove(seq)
            self.pool.release(seq.blocks)
            seq.blocks = []
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.frontend:
            self.frontend.remove(seq)
        seq.phase = Phase.ABORTED

    # -- live migration ------------------------------------------------------------------------
    def pause(self, seq: Sequence) -> None:
        """Take a running request out of scheduling, keeping its KV blocks: a step in flight
        skips it, so its state (tokens sampled, KV computed) stays fixed until `resume` or `abort`."""
        if seq.phase != Phase.RUNNING:
            raise ValueError(f"only a running request can be paused (phase {seq.phase.name})")
        self.running.remove(seq)
        seq.phase = Phase.PAUSED

    def resume(self, seq: Sequence) -> None:
        """Undo `pause` (a migration that failed): the request decodes on from where it stopped."""
        if seq.phase != Phase.PAUSED:
            raise ValueError(f"only a paused request can be resumed (phase {seq.phase.name})")
        seq.phase = Phase.RUNNING
        self.running.append(seq)

    def can_adopt(self, tokens: int) -> bool:
        """Room for a migrated request whose KV covers `tokens` (a batch slot and its blocks)."""
        return len(self.running) < self.max_num_seqs and self._blocks_for(tokens + 1) <= self.pool.num_available

    def adopt(self, seq: Sequence) -> None:
        """Start a request migrated in mid-decode: its KV for `seq.computed` tokens has arrived,
        so it joins the running batch at the same position (no prefill). Prompt blocks this
        instance already caches are shared; the rest are registered as the request steps on."""
        if not seq.decoding:
            raise ValueError("only a decoding request (KV for all tokens but the last sampled) can be adopted")
        if not self.can_adopt(seq.computed):
            raise ValueError("no room for the migrated request (batch slots or KV blocks)")
        limit = min(len(seq.block_hashes), seq.computed // self.block_size)
        hits = self.pool.match_prefix(seq.block_hashes, limit)
        need = self._blocks_for(seq.computed) - len(hits)
        if need > self.pool.num_available - self.pool.evictable_among(hits):
            raise ValueError("no room for the migrated request (KV blocks)")
        self.pool.touch(hits)
        seq.blocks = hits + self.pool.allocate(need)
        seq.num_hashed = len(hits)
        seq.admitted = True
        seq.phase = Phase.RUNNING
        self.running.append(seq)

    # -- cache handover (scale events) ---------------------------------------------------------
    def cached_prefix(self, block_hashes: list[int]) -> list[int]:
        """The leading hashes of `block_hashes` whose KV this instance caches."""
        return block_hashes[: len(self.pool.match_prefix(block_hashes, len(block_hashes)))]

    def warm(self, block_hashes: list[int]) -> int:
        """Insert a prefix whose KV arrived from another instance into the prefix cache, as
        cached blocks no request holds (evictable, most recently used); returns the blocks added.
        Blocks already cached are kept; the rest are cut to the room there is."""
        have = len(self.pool.match_prefix(block_hashes, len(block_hashes)))
        new = block_hashes[have : have + self.pool.num_available]
        blocks = self.pool.allocate(len(new))
        for b, h in zip(blocks, new, strict=True):
            self.pool.register(b, h)
        self.pool.release(blocks)
        return len(blocks)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.frontend)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def kv_usage(self) -> float:
        return self.pool.usage()

    def pending_prompt_tokens(self) -> int:
        """Prompt tokens of the requests that have not yet produced their first token (the prefill
        work every router replica's requests have here; exported for active-active routers)."""
        return sum(s.prompt_tokens for group in (self.frontend, self.waiting, self.running) for s in group
                   if s.output == 0)

    # -- scheduling --------------------------------------------------------------------------
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _grow(self, seq: Sequence, tokens_with_kv: int) -> bool:
        need = self._blocks_for(tokens_with_kv) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.pool.num_available:
            return False
        seq.blocks.extend(self.pool.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks = []
        seq.computed = 0
        seq.num_hashed = 0
        seq.phase = Phase.WAITING
        seq.preemptions += 1
        self.counters.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Try to start a waiting request; returns the tokens it will compute (0: not now)."""
        pool = self.pool
        hits: list[int] = []
        if seq.computed == 0:
            limit = min(len(seq.block_hashes), (seq.num_tokens - 1) // self.block_size)
            hits = pool.match_prefix(seq.block_hashes, limit)
        computed = len(hits) * self.block_size
        external = 0
        if not seq.admitted and seq.external_tokens:
            external = max(0, min(seq.external_tokens, seq.num_tokens - 1) - computed)
        start = computed + external
        n = min(seq.num_tokens - start, budget)
        need = self._blocks_for(start + n) - len(hits)
        if need > pool.num_available - pool.evictable_among(hits):
            return 0
        pool.touch(hits)
        seq.blocks = hits + pool.allocate(need)
        seq.num_hashed = len(hits)
        seq.computed = start
        c = self.counters
        if not seq.admitted:
            seq.admitted = True
            seq.cached_tokens = computed
            c.prompt_tokens += seq.prompt_tokens
            c.prompt_tokens_local_cache_hit += computed
            c.prompt_tokens_external += external
            c.prompt_tokens_local_compute += seq.prompt_tokens - computed - external
        if seq.preemptions:
            c.preempted_cache_queries += seq.prompt_tokens
            c.preempted_cache_hits += computed
        else:
            c.prefix_cache_queries += seq.prompt_tokens
            c.prefix_cache_hits += computed
        seq.phase = Phase.RUNNING
        return n

    def schedule(self, now: float = 0.0, max_steps: int = 1) -> StepPlan | None:
        """Pick the next step's work and allocate its blocks. `max_steps` > 1 lets a pure decode
        step cover that many identical steps (virtual time). Requests still in the front-end stage
        have their front-end work done first, in this step's time, and join it."""
        frontend, self.frontend = self.frontend, []
        self.waiting.extend(frontend)
        busy = bool(self.running)
        budget = self.max_num_batched_tokens
        items: list[tuple[Sequence, int]] = []
        preempted = False
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(seq.num_tokens - seq.computed, budget)
            while not self._grow(seq, seq.computed + n):
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                items.append((seq, n))
                budget -= n
                i += 1
                continue
            break  # `seq` itself was preempted
        all_running_scheduled = len(items) == len(running)
        admitted_blocked = False
        if not preempted:
            while self.waiting and budget > 0 and len(running) < self.max_num_seqs:
                seq = self.waiting[0]
                n = self._admit(seq, budget)
                if n == 0:
                    admitted_blocked = True
                    break
                self.waiting.popleft()
                if seq.first_scheduled is None:
                    seq.first_scheduled = now
                running.append(seq)
                items.append((seq, n))
                budget -= n
        if not items and not frontend:
            return None
        plan = self._timing(items)
        plan.start = now
        new_shape = self._shape_miss(items) if self._shapes_on else 0.0
        plan.first_step_s += new_shape
        if frontend:  # one core: the API server's work, then the step's forward pass
            plan.frontend = frontend
            work = sum(map(self.frontend_s, frontend))
            if busy:
                work += self.profile.busy_frontend_s * len(frontend)
            plan.first_step_s = (plan.first_step_s if items else 0.0) + work
        elif max_steps > 1 and not preempted and all_running_scheduled and not new_shape:
            nobody_admissible = not self.waiting or admitted_blocked or len(running) >= self.max_num_seqs
            if nobody_admissible and all(n == 1 and s.output > 0 for s, n in items):
                self._extend(plan, max_steps)
        return plan

    def mark_built(self, counts: Iterable[int]) -> None:
        """Record step token counts whose kernels are built (newest last), keeping the last
        `shape_cache_size` distinct ones: the engine's own steps, or what a driver knows the real
        engine ran outside this model (bench/sim_fidelity.py)."""
        shapes = self.shapes
        for n in counts:
            shapes[n] = None
            shapes.move_to_end(n)
        while len(shapes) > self.profile.shape_cache_size:
            shapes.popitem(last=False)

    def _shape_miss(self, items: list[tuple[Sequence, int]]) -> float:
        """The time to build a step's kernels if its count of batched tokens is not among the last
        `shape_cache_size` distinct counts run, else 0; records the count as the newest."""
        tokens = sum(n for _, n in items)
        if tokens <= 0:
            return 0.0
        built = tokens in self.shapes
        self.mark_built((tokens,))
        p = self.profile
        return 0.0 if built else p.new_shape_s + p.new_shape_token_s * tokens

    def _timing(self, items: list[tuple[Sequence, int]]) -> StepPlan:
        p = self.profile
        prefill_tokens = 0
        attn_pairs = 0.0
        decodes = 0
        decode_ctx = 0
        for seq, n in items:
            if n == 1 and seq.output > 0:
                decodes += 1
                decode_ctx += seq.computed
            else:
                prefill_tokens += n
                attn_pairs += n * (seq.computed + n / 2)
        first = (p.step_s + p.prefill_token_s * prefill_tokens + p.attn_pair_s * attn_pairs
                 + p.decode_seq_s * decodes + p.decode_ctx_s * decode_ctx)
        return StepPlan(items, 1, first, p.decode_ctx_s * decodes)

    def _extend(self, plan: StepPlan, max_steps: int) -> None:
        k = min(max_steps, min(s.max_tokens - s.output for s, _ in plan.items))
        while k > 1:
            need = sum(max(0, self._blocks_for(s.computed + k) - len(s.blocks)) for s, _ in plan.items)
            if need <= self.pool.num_available:
                break
            k //= 2
        if k <= 1:
            return
        for seq, _ in plan.items:
            self._grow(seq, seq.computed + k)
        plan.steps = k

    def truncate(self, plan: StepPlan, now: float) -> None:
        """Cut a multi-step plan at the step in flight at `now` (an arrival joins after it)."""
        if plan.steps > 1:
            plan.steps = plan.steps_done_by(now - plan.start)

    # -- progress ----------------------------------------------------------------------------
    def commit(self, plan: StepPlan, now: float) -> list[Sequence]:
        """Apply a planned step (or `plan.steps` of them) ending at `now`; returns the sequences
        that sampled tokens. Finished ones have `phase == FINISHED` and their blocks freed."""
        k = plan.steps
        bs = self.block_size
        pool = self.pool
        c = self.counters
        c.steps += k
        emitted: list[Sequence] = []
        finished = False
        for seq, n in plan.items:
            if seq.phase != Phase.RUNNING:  # aborted while the step ran
                continue
            if k == 1:
                seq.computed += n
                sampled = 1 if seq.computed == seq.num_tokens else 0
            else:  # k identical decode steps: each computes one token's KV and samples the next
                seq.computed += k
                sampled = k
            # Register newly completed full prompt blocks in the prefix cache.
            full = min(seq.computed, seq.prompt_tokens) // bs
            if full > seq.num_hashed:
                hashes, blocks = seq.block_hashes, seq.blocks
                for j in range(seq.num_hashed, min(full, len(hashes))):
                    pool.register(blocks[j], hashes[j])
                seq.num_hashed = full
            if not sampled:
                continue
            seq.output += sampled
            c.generation_tokens += sampled
            if seq.first_token_time is None:
                seq.first_token_time = now
            emitted.append(seq)
            if seq.output >= seq.max_tokens:
                seq.phase = Phase.FINISHED
                seq.finish_time = now
                pool.release(seq.blocks)
                seq.blocks = []
                c.request_success += 1
                finished = True
            elif k > 1:
                extra = len(seq.blocks) - self._blocks_for(seq.computed)
                if extra > 0:  # truncated plan: hand back blocks reserved for later steps
                    pool.release(seq.blocks[-extra:])
                    del seq.blocks[-extra:]
        if finished:
            self.running = [s for s in self.running if s.phase == Phase.RUNNING]
        return emitted
