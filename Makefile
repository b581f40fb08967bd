# The README's two commands: `make demo` and `make test`. They work on a machine with
# only python3 and make: uv is installed with pip when it is missing, and uv builds
# .venv from uv.lock exactly, compiled to bytecode once (below).
UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)

.PHONY: install demo test bench clean

install: .venv/.installed

.venv/.installed: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) sync --locked --compile-bytecode
	@touch $@

demo: install
	$(UV) run --locked tff-apps demo

test: install
	$(UV) run --locked pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

bench: install
	$(UV) run --locked python benchmarks/psi_bench.py
	$(UV) run --locked python benchmarks/vertical_bench.py
	$(UV) run --locked python benchmarks/secure_aggregation_bench.py
	$(UV) run --locked python benchmarks/engine_bench.py
	$(UV) run --locked python benchmarks/grouped_features_bench.py
	$(UV) run --locked python benchmarks/sites_bench.py
	$(UV) run --locked python benchmarks/traffic_graph_bench.py

clean:
	rm -rf .venv runs .pytest_cache
