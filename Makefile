# kvpilot developer entry points. `make test` is the one command CI runs.
.PHONY: demo test lint dashboards k8s-harness clean

# The main job: the local control plane on simulated GPUs under a replayed trace (kvpilot demo).
demo:
	bash scripts/demo.sh $(ARGS)

test:
	bash scripts/test.sh $(ARGS)

lint:
	bash scripts/lint.sh

# Regenerate the Grafana dashboards and Prometheus rules (deploy/ and the chart's copies) from core/dashboards/.
dashboards:
	.venv/bin/python -P -m kvpilot.dashboards

# Start the real test control plane by hand (full mode, 2 kwok GPU nodes); Ctrl-C stops it.
k8s-harness:
	scripts/k8s-harness --mode full

clean:
	rm -rf .build .venv .pytest_cache .ruff_cache *.egg-info
