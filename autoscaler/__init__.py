"""SLO-aware replica planning for prefill and decode pools."""
