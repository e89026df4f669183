"""The operators' endpoints: metrics, the live dashboard, the KV-index check, and the hooks the
local mode and the autoscaler call (live migration, scale-event handover). None of them is on a
client's request path, and they are served on their own listener (`adminPort`, default the client
port + 1 on 127.0.0.1) with their own bearer token (`adminTokenFile`): a client must not trigger
migrations or probe which prefixes another tenant has cached. Only /metrics is on both ports."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvpilot.router.dashboard import page
from kvpilot.router.policy import RequestView
from kvpilot.router.runtime import Runtime


class Admin:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def routes(self) -> list[web.RouteDef]:
        rt = self.runtime
        return [self.metrics_route(),
                web.get("/dashboard", self.dashboard),
                web.get("/dashboard/data", self.dashboard_data),
                web.post("/debug/kv-match", self.kv_match),
                web.post("/kvpilot/migrate", rt.migrator.handle),
                web.post("/kvpilot/handover", rt.handovers.handle)]

    def metrics_route(self) -> web.RouteDef:
        """/metrics is served on the client port too: Prometheus scrapes the pod's `http` port."""
        return web.get("/metrics", self.metrics)

    async def metrics(self, request: web.Request | None) -> web.Response:
        """Prometheus text; gauges that are cheaper to read here than to keep current are set now."""
        m = self.runtime.metrics
        for name, model in self.runtime.models.items():
            for role, pool in model.roles():   # the decode pool is "decode" here as everywhere else
                m.members.labels(name, role).set(len(pool.healthy()))
            for role, pool in model.roles():
                estimate = pool.policy.cache_estimate()
                if estimate is not None:
                    token_s = estimate.token_s
                    for x in pool.members:
                        if x.endpoint.name in token_s:
                            m.prefill_token_s.labels(name, role, x.endpoint.name).set(token_s[x.endpoint.name])
                if pool.holder is not None:
                    depths = pool.queued()
                    for x in pool.members:
                        m.queue_depth.labels(name, role, x.endpoint.name).set(depths.get(x.endpoint.name, 0))
        return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def dashboard(self, request: web.Request) -> web.Response:
        return web.Response(text=page(), content_type="text/html")

    async def dashboard_data(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        counters = self.runtime.cache_counters
        models = []
        for name, s in self.runtime.models.items():
            members = {m.endpoint.name: m for pool in s.pools() for m in pool.members}
            endpoints = [{"name": m.endpoint.name, "role": m.endpoint.role, "in_flight": m.load.in_flight,
                          "pending_prefill_tokens": m.load.pending_prefill_tokens,
                          "engine_running": m.load.engine_running, "engine_waiting": m.load.engine_waiting,
                          "kv_usage": m.load.kv_usage, "breaker_open": m.breaker.is_open(now),
                          "cache_hits": counters.get(m.url, (0.0, 0.0))[0],
                          "cache_queries": counters.get(m.url, (0.0, 0.0))[1]}
                         for m in members.values()]
            models.append({"name": name, "policy": s.config.policy, "slo_ttft_s": s.config.slo_ttft_ms / 1000,
                           "slo_tpot_s": s.config.slo_tpot_ms / 1000, "endpoints": endpoints,
                           "series": s.timeline.series(), "scaling": s.scaling_events,
                           "migrations": list(self.runtime.migrator.recent.get(name, ()))})
        return web.json_response({"models": models})

    async def kv_match(self, request: web.Request) -> web.Response:
        """What the KV-event index says each instance holds of a prompt (`{"model", "prompt"}`, or
        `{"model", "messages"}` for a chat): for checking the router's view against the engines'."""
        body = await request.json()
        model = self.runtime.models.get(str(body.get("model")))
        index = None if model is None else model.kv_index
        if index is None:
            return web.json_response({"error": "model does not follow KV events"}, status=404)
        if "messages" in body:
            keys = index.chat_keys(body["messages"])
        else:
            keys = index.prompt_keys(str(body.get("prompt", "")))
        view = RequestView("kv-match", 0, [], engine_blocks=keys)
        return web.json_response({"prompt_blocks": len(view.engine_blocks), "blocks": index.summary(),
                                  "cached_tokens": {n: index.cached_tokens(n, view) for n in index.instances}})
