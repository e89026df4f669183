"""`kvpilot router` as a real process on loopback, in front of workers the test started."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import yaml

from kvpilot.procs import ManagedProcess, free_port, wait_for
from kvpilot.testing.server import ServerProcess


class RouterProcess(ServerProcess):
    client_timeout_s = 60

    def __init__(self, models: list[dict[str, Any]], workdir: Path | None = None, **settings: Any) -> None:
        self.port = free_port()
        self.admin_port = int(settings.pop("adminPort", 0) or free_port())
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="kvpilot-router-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        config = {"host": "127.0.0.1", "port": self.port, "adminPort": self.admin_port, "models": models, **settings}
        self.config_path = self.dir / f"router-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        argv = [sys.executable, "-P", "-m", "kvpilot.cli", "router", "--config", str(self.config_path)]
        self.proc = ManagedProcess(f"router-{self.port}", argv, self.dir / f"router-{self.port}.log")
        wait_for(self.healthy, 30, f"router on port {self.port}", self.proc)

    @property
    def admin_url(self) -> str:
        """The admin listener: dashboard, debug, migrate and handover (not on the client port)."""
        return f"http://{self.host}:{self.admin_port}"


@dataclass
class StreamOutcome:
    """What one client saw of its completion stream through the router."""

    prompt: str
    endpoint: str = ""                       # the worker that served it (X-Kvpilot-Endpoint)
    text: str = ""
    finish: str | None = None
    completion_tokens: int | None = None
    error: BaseException | None = None       # set by the caller: how a stream ended is what fault tests judge


def stream_completion(client: openai.OpenAI, out: StreamOutcome, max_tokens: int, model: str = "sim-model",
                      each_chunk: Callable[[StreamOutcome], object] | None = None) -> StreamOutcome:
    """Stream the completion of `out.prompt` into `out` (endpoint, text, finish reason, usage),
    calling `each_chunk(out)` after every chunk. Errors propagate: the fault tests record them as
    the stream's ending and judge it."""
    stream = client.completions.create(model=model, prompt=out.prompt, max_tokens=max_tokens,
                                       stream=True, stream_options={"include_usage": True})
    out.endpoint = stream.response.headers.get("X-Kvpilot-Endpoint", "")
    for chunk in stream:
        if chunk.usage is not None:
            out.completion_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            out.text += choice.text
            out.finish = choice.finish_reason or out.finish
        if each_chunk is not None:
            each_chunk(out)
    return out
