# kvpilot developer entry points. `make test` is the one command CI runs.
.PHONY: demo test lint k8s-harness clean

# The main job: the local control plane on simulated GPUs under a replayed trace (kvpilot demo).
demo:
	bash scripts/demo.sh $(ARGS)

test:
	bash scripts/test.sh $(ARGS)

lint:
	bash scripts/lint.sh

# Start the real test control plane by hand (full mode, 2 kwok GPU nodes); Ctrl-C stops it.
k8s-harness:
	scripts/k8s-harness --mode full

clean:
	rm -rf .build .venv .pytest_cache .ruff_cache *.egg-info
