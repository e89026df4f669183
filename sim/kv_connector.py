"""How a simulated prefill instance hands KV to a decode instance (vLLM's P/D flow).

The prefill request carries `kv_transfer_params: {"do_remote_decode": true}` and `max_tokens=1`;
its response carries the params the decode request must send back (`do_remote_prefill`, the
remote engine and block ids). This module keeps that contract behind one small interface so
the KV-transfer work can back it with the Redis block store. `LocalKVConnector` moves no bytes:
it records which prompts a prefill exported, and the decode side trusts the params.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True)
class KVImport:
    tokens: int            # prompt tokens whose KV the decode side now has
    transfer_s: float      # modelled transfer time, in engine seconds


class KVConnector(Protocol):
    def export(self, request_id: str, prompt_tokens: int, block_hashes: list[int]) -> dict[str, Any]: ...

    async def import_kv(self, params: dict[str, Any], prompt_tokens: int) -> KVImport: ...


class LocalKVConnector:
    """P/D params with vLLM's field names; the transfer time is bytes over a nominal link."""

    def __init__(self, engine_id: str, host: str, port: int, kv_bytes_per_token: int,
                 link_bytes_per_s: float = 25e9) -> None:
        self.engine_id = engine_id
        self.host = host
        self.port = port
        self.kv_bytes_per_token = kv_bytes_per_token
        self.link_bytes_per_s = link_bytes_per_s

    def export(self, request_id: str, prompt_tokens: int, block_hashes: list[int]) -> dict[str, Any]:
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.engine_id,
                "remote_block_ids": block_hashes, "remote_host": self.host, "remote_port": self.port,
                "remote_request_id": request_id, "num_tokens": prompt_tokens}

    async def import_kv(self, params: dict[str, Any], prompt_tokens: int) -> KVImport:
        tokens = min(int(params.get("num_tokens", prompt_tokens)), prompt_tokens)
        return KVImport(tokens, tokens * self.kv_bytes_per_token / self.link_bytes_per_s)
