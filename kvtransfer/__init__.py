"""KV block store and transfer API (Redis backend, NIXL-style descriptors)."""
