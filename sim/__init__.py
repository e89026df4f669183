"""vLLM-compatible GPU simulator: engine model, real-time server, virtual-time cluster."""
