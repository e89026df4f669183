"""OpenAI-compatible streaming proxy and routing policies (DualMap and baselines)."""
