"""kvpilot on Ray Serve (`pip install kvpilot[ray]`): kvpilot's routing policies as a Ray Serve
request router, and the simulator's engine model as a Serve deployment.

`kvpilot.ray.adapter` and `kvpilot.ray.prompt` are pure (no Ray import), so the mapping from
Ray's replica set and load signals to a policy is tested without Ray; `kvpilot.ray.router` and
`kvpilot.ray.app` are the thin shells that import `ray.serve`.
"""
