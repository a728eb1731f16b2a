# One entry point for every task; CI runs `make test` through .ci/run.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# facenet-pytorch ships MTCNN's trained networks (the `faces` demo). Its own pins (torch<2.3, numpy<2) are older
# than our stack, and its networks need only torch: it is installed without its dependencies (requirements-nodeps.lock,
# which `make lock` writes from this line).
NO_DEPS := facenet-pytorch==2.6.0
# Every requirements set is an input edited by hand (requirements.txt, tests/requirements.txt, ...) and a lock beside it
# (requirements.lock, tests/requirements.lock, ...) that `make lock` writes: every transitive dependency pinned, with
# the sha256 of each of its files. The venvs install the locks only, and pip refuses a file whose hash is not there.
# Each install marker is named after its lock's digest, so a venv installs again only when its lock changed.
PIP_LOCKED = $(1) -m pip install -q --require-hashes
INSTALLED := $(VENV)/.installed-$(shell cat requirements.lock requirements-nodeps.lock | sha256sum | cut -c1-12)
# The demos train under pinned kernels (archive_scripts/pinned_kernels.py), so every x86-64 CPU with AVX2 trains the
# weights pinned in archive_scripts/demo_weights.json; ACCEPT_OTHER_WEIGHTS=1 keeps weights that differ from them.
TRAINED := artifacts/weights/.trained
NAME ?= shapes

.PHONY: setup demo build kserve gpu-check serve stop test test-fast lint lock lock-check docs schema register unregister rebuild evaluate inspect bench bench-quick bench-tune bench-eager bench-mlp bench-profile bench-batching bench-fused bench-options bench-early-exit bench-deadline bench-pinned-training bench-auto bench-engines bench-request-profile tune reliability reliability-full clean prometheus monitor monitor-stop monitor-traffic monitor-report

$(INSTALLED): requirements.lock requirements-nodeps.lock
	@command -v java >/dev/null 2>&1 || { echo "installing a Java runtime for TorchServe"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless; }
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: Python 3.11 is required"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(call PIP_LOCKED,$(PY)) -r requirements.lock
	$(call PIP_LOCKED,$(PY)) --no-deps -r requirements-nodeps.lock
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(INSTALLED)

EVAL_INSTALLED := $(VENV)/.eval-$(shell sha256sum archive_scripts/requirements-eval.lock | cut -c1-12)

$(TRAINED): $(INSTALLED) $(EVAL_INSTALLED) ensembles.yaml archive_scripts/demo_data.py archive_scripts/demo_models.py archive_scripts/train_demo.py archive_scripts/checkpoint_layouts.py archive_scripts/digits_demo.py archive_scripts/faces_demo.py \
		archive_scripts/pinned_kernels.py archive_scripts/demo_weights.py archive_scripts/demo_weights.json
	$(PY) -m archive_scripts.faces_demo
	$(PY) -m archive_scripts.train_demo $(if $(ACCEPT_OTHER_WEIGHTS),--accept-other-weights)
	$(PY) -m archive_scripts.demo_data artifacts/samples
	$(PY) -m archive_scripts.digits_demo artifacts/samples
	@touch $@

demo: $(TRAINED)

build: $(TRAINED)
	$(PY) -m archive_scripts.build_archives

# make kserve NAME=shapes: build/kserve/<name>/ (config/ and model-store/) to upload as a KServe storageUri.
kserve: build
	$(PY) -m archive_scripts.kserve_export $(NAME)

serve: build
	$(PY) -m archive_scripts.torchserve_ctl stop
	$(PY) -m archive_scripts.torchserve_ctl start
	$(PY) -m archive_scripts.torchserve_ctl register
	@echo "Try it:"
	@$(PY) -m archive_scripts.torchserve_ctl curl

stop: $(INSTALLED)
	$(PY) -m archive_scripts.torchserve_ctl stop

TUNE_INSTALLED := $(VENV)/.tune-$(shell sha256sum bench/requirements-tune.lock | cut -c1-12)

$(TUNE_INSTALLED): $(INSTALLED) bench/requirements-tune.lock
	$(call PIP_LOCKED,$(PY)) -r bench/requirements-tune.lock
	@rm -f $(VENV)/.tune-* && touch $@

$(EVAL_INSTALLED): $(INSTALLED) archive_scripts/requirements-eval.lock
	$(call PIP_LOCKED,$(PY)) -r archive_scripts/requirements-eval.lock
	@rm -f $(VENV)/.eval-* && touch $@

# Prometheus 2.42 and promtool from Debian 12's package, unpacked into .tools/prometheus like a venv: not
# installed, because the package's maintainer scripts would start a system Prometheus on 0.0.0.0:9090.
# apt-get checks each file against the archive's signed index. The libjs and font packages are the
# ones it depends on for its web UI (/classic/graph); its relative links into them resolve inside
# .tools/prometheus. As root, apt warns that the download is unsandboxed; it does that for any folder
# its _apt user cannot write.
PROMETHEUS_TOOLS := .tools/prometheus
PROMETHEUS_UNPACKED := $(PROMETHEUS_TOOLS)/.unpacked
PROMETHEUS_DEBS := prometheus libjs-jquery libjs-jquery-hotkeys libjs-bootstrap4 libjs-popper.js libjs-d3 libjs-rickshaw \
	libjs-moment libjs-moment-timezone libjs-eonasdan-bootstrap-datetimepicker libjs-mustache fonts-glyphicons-halflings
MINUTES ?= 30

$(PROMETHEUS_UNPACKED):
	@command -v dpkg >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 || { echo "apt-get and dpkg are needed: Prometheus comes from Debian's package"; exit 1; }
	@echo "unpacking Debian's prometheus into $(PROMETHEUS_TOOLS) (not installed: no service is started)"
	@rm -rf $(PROMETHEUS_TOOLS) .tools/debs && mkdir -p .tools/debs
	@cd .tools/debs && { apt-get download -qq $(PROMETHEUS_DEBS) 2>/dev/null || { apt-get update -qq && apt-get download -qq $(PROMETHEUS_DEBS); }; }
	@for deb in .tools/debs/*.deb; do dpkg -x "$$deb" $(PROMETHEUS_TOOLS) || exit 1; done
	@rm -rf .tools/debs
	@$(PROMETHEUS_TOOLS)/usr/bin/prometheus --version >/dev/null && $(PROMETHEUS_TOOLS)/usr/bin/promtool --version > $@.tmp
	@mv $@.tmp $@ && head -n 1 $@

prometheus: $(PROMETHEUS_UNPACKED)

# make monitor: Prometheus on 127.0.0.1:9090 scraping the TorchServe of `make serve` (monitoring/prometheus.yml).
monitor: $(INSTALLED) $(PROMETHEUS_UNPACKED)
	$(PY) -m monitoring.prometheus_ctl stop
	$(PY) -m monitoring.prometheus_ctl start

monitor-stop: $(INSTALLED)
	$(PY) -m monitoring.prometheus_ctl stop

# make monitor-traffic [SECONDS=180]: a bounded mix of requests to the `make serve` TorchServe, for the report.
monitor-traffic: $(INSTALLED)
	$(PY) -m monitoring.demo_traffic --seconds $(or $(SECONDS),180)

# make monitor-report [MINUTES=30]: the dashboard's series from that Prometheus, drawn to docs/monitor_report.png.
monitor-report: $(EVAL_INSTALLED)
	$(PY) -m monitoring.report --minutes $(MINUTES) --out docs/monitor_report.png

# The docs site's own stack (docs/requirements.txt) in the same venv. Material's build prints a banner about its
# end of life (May 2027; docs/libraries.md records it): NO_MKDOCS_2_WARNING keeps it out of every test run.
DOCS_INSTALLED := $(VENV)/.docs-$(shell sha256sum docs/requirements.lock | cut -c1-12)
MKDOCS := NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs

$(DOCS_INSTALLED): $(INSTALLED) docs/requirements.lock
	$(call PIP_LOCKED,$(PY)) -r docs/requirements.lock
	@rm -f $(VENV)/.docs-* && touch $@

# make docs: the site (mkdocs.yml) into build/site. --strict: a broken link, anchor or missing page is an error.
docs: $(DOCS_INSTALLED)
	$(MKDOCS) build --strict

# Test-only tools (check-jsonschema, which tests/test_schema.py runs on every shipped ensembles file).
TESTS_INSTALLED := $(VENV)/.tests-$(shell sha256sum tests/requirements.lock | cut -c1-12)

$(TESTS_INSTALLED): $(INSTALLED) tests/requirements.lock
	$(call PIP_LOCKED,$(PY)) -r tests/requirements.lock
	@rm -f $(VENV)/.tests-* && touch $@

# The development tools (requirements-dev.txt: ruff, mypy and the stubs it needs, uv), configured in pyproject.toml.
LINT_INSTALLED := $(VENV)/.lint-$(shell sha256sum requirements-dev.lock | cut -c1-12)

$(LINT_INSTALLED): $(INSTALLED) requirements-dev.lock
	$(call PIP_LOCKED,$(PY)) -r requirements-dev.lock
	@rm -f $(VENV)/.lint-* && touch $@

# make lint: the locks against their inputs (lock-check below), ruff's formatter (check only: `.venv/bin/ruff format`
# rewrites), ruff's linter and mypy; all four run and each reports. mypy reads the tests, the benchmarks and the scripts too, so the sets they import are installed first.
lint: $(INSTALLED) $(LINT_INSTALLED) $(TESTS_INSTALLED) $(EVAL_INSTALLED) $(TUNE_INSTALLED) $(DOCS_INSTALLED)
	@status=0; \
	echo "lock-check"; $(MAKE) -s lock-check || status=1; \
	echo "ruff format --check"; $(VENV)/bin/ruff format --check . || status=1; \
	echo "ruff check"; $(VENV)/bin/ruff check . || status=1; \
	echo "mypy"; $(PY) -m mypy || status=1; \
	exit $$status

# make lock: every lock written again from its input, keeping each locked version the inputs still allow (UPGRADE=1:
# the newest versions they allow; UPGRADE_PACKAGES='name ...': only those). All of .venv's sets are resolved together
# first (constraints.txt) and each of their locks is compiled against that, so the sets layer into .venv without
# moving each other's pins. The Triton venv's lock takes the same pins but numpy and protobuf (PyTriton 0.7.0 needs
# numpy<2, its Triton gRPC client protobuf<7), for Linux x86-64 with glibc 2.35 (PyTriton's wheel); the others for
# glibc 2.28. Python 3.11.0 and later: Debian 12's interpreter (3.11.2) runs the Triton venv.
VENV_SETS := requirements.txt requirements-dev.txt tests/requirements.txt docs/requirements.txt \
	archive_scripts/requirements-eval.txt bench/requirements.txt bench/requirements-tune.txt
UV_COMPILE = $(VENV)/bin/uv pip compile --quiet --custom-compile-command 'make lock' --python-version 3.11 \
	$(if $(UPGRADE),--upgrade) $(foreach p,$(UPGRADE_PACKAGES),--upgrade-package $(p))
LOCK_PLATFORM := --python-platform x86_64-manylinux_2_28

# make lock-check (part of make lint, offline): every requirement of every input is in its lock, at the version the
# input pins, so an input edited without `make lock` fails here rather than installing what it no longer says.
LOCK_CHECK = awk 'FNR == NR { if (match($$0, /^[a-z0-9][a-z0-9._-]*==[^ ]+/)) { split(substr($$0, 1, RLENGTH), pin, "=="); \
	locked[pin[1]] = pin[2] }; next } { c = index($$0, "\043"); if (c) $$0 = substr($$0, 1, c - 1); gsub(/[ \t]/, ""); \
	sub(/\[[^]]*\]/, ""); if ($$0 == "") next; n = split($$0, req, "=="); name = tolower(req[1]); gsub(/[._]+/, "-", name); \
	if (!(name in locked) || (n == 2 && locked[name] != req[2])) { print FILENAME ": " $$0 " is not in " ARGV[1] \
	": run make lock"; stale = 1 } } END { exit stale }' $(1) $(2)

lock-check:
	@stale=0; for set in $(VENV_SETS) bench/requirements-triton.txt; do \
		$(call LOCK_CHECK,$${set%.txt}.lock,$$set) || stale=1; done; \
	echo '$(NO_DEPS)' | $(call LOCK_CHECK,requirements-nodeps.lock,-) || stale=1; \
	exit $$stale

lock: $(LINT_INSTALLED)
	$(UV_COMPILE) $(LOCK_PLATFORM) $(VENV_SETS) -o constraints.txt
	@for set in $(VENV_SETS); do echo "$${set%.txt}.lock"; \
		$(UV_COMPILE) $(LOCK_PLATFORM) --generate-hashes -c constraints.txt $$set -o $${set%.txt}.lock || exit 1; done
	echo '$(NO_DEPS)' | $(UV_COMPILE) $(LOCK_PLATFORM) --generate-hashes --no-deps --no-annotate - -o requirements-nodeps.lock
	@mkdir -p build && grep -v -E '^(numpy|protobuf)==' constraints.txt > build/constraints-triton.txt
	$(UV_COMPILE) --python-platform x86_64-manylinux_2_35 --generate-hashes -c build/constraints-triton.txt \
		bench/requirements-triton.txt -o bench/requirements-triton.lock

# ensembles.schema.json from the config models (handlers/config/schema.py); a test fails while it is stale.
schema: $(INSTALLED)
	$(PY) -m archive_scripts.write_schema

# The docs are built first (seconds), so a broken link fails before the suite runs. The docs' examples run
# against the trained demos: trained here when absent (a clean clone), never retrained by the tests.
test: $(INSTALLED) $(TESTS_INSTALLED) $(EVAL_INSTALLED) $(TUNE_INSTALLED) $(DOCS_INSTALLED) $(PROMETHEUS_UNPACKED)
	$(MKDOCS) build --strict
	@test -e $(TRAINED) || $(MAKE) demo
	$(PY) -m pytest

# The inner loop: `make lint` beside the unit tests (mypy takes one core for ~40 s on a cold cache, the tests the other);
# the lint's report is printed after the tests'. No server starts, nothing trains, no archive is built and no plan is
# timed (the pytest markers in pyproject.toml). NO_LINT=1 leaves the lint out.
test-fast: $(INSTALLED) $(TESTS_INSTALLED) $(EVAL_INSTALLED) $(TUNE_INSTALLED) $(DOCS_INSTALLED) $(PROMETHEUS_UNPACKED) $(if $(NO_LINT),,$(LINT_INSTALLED))
	@mkdir -p build; $(if $(NO_LINT),:,$(MAKE) -s lint > build/lint.log 2>&1 & lint=$$!); \
	$(PY) -m pytest -m "not integration and not slow"; status=$$?; \
	$(if $(NO_LINT),:,wait $$lint || status=1; echo "make lint:"; cat build/lint.log); \
	exit $$status

register: $(INSTALLED)
	$(PY) -m archive_scripts.torchserve_ctl register $(NAME)

unregister: $(INSTALLED)
	$(PY) -m archive_scripts.torchserve_ctl unregister $(NAME)

rebuild: $(TRAINED)
	$(PY) -m archive_scripts.build_archives $(NAME)
	-$(PY) -m archive_scripts.torchserve_ctl unregister $(NAME)
	$(PY) -m archive_scripts.torchserve_ctl register $(NAME)

evaluate: $(TRAINED) $(EVAL_INSTALLED)
	$(PY) -m archive_scripts.evaluate_demo --plot docs/demo_precision_recall.png --faces-plot docs/faces_corruptions.png --json artifacts/evaluation.json --tta \
		--cascade-plot docs/cascade_cost.png --risk-plot docs/risk_coverage.png

inspect: $(INSTALLED)
	@test -n "$(FILE)" -a -n "$(ARCH)" || { echo "usage: make inspect FILE=path/to/checkpoint ARCH=torchvision:<builder>|timm:<model>|<package.module>:<Name>|<file.py>:<Class> [KWARGS='{\"num_classes\": 14}'] [INPUT=3,48,48]"; exit 2; }
	$(PY) -m archive_scripts.inspect_checkpoint "$(FILE)" --arch "$(ARCH)" --kwargs '$(or $(KWARGS),{})' $(if $(INPUT),--input $(INPUT))

BENCH_INSTALLED := $(VENV)/.bench-$(shell sha256sum bench/requirements.lock | cut -c1-12)

$(BENCH_INSTALLED): $(INSTALLED) bench/requirements.lock
	$(call PIP_LOCKED,$(PY)) -r bench/requirements.lock
	@rm -f $(VENV)/.bench-* && touch $@

# The Triton contender's own venv: PyTriton's Python stub links the system libpython3.11, so the venv must
# come from Debian's interpreter (with another 3.11 first on PATH the stub fails), and PyTriton needs numpy<2.
TRITON_PYTHON := /usr/bin/python3.11
TRITON_VENV := .venv-triton
TRITON_INSTALLED := $(TRITON_VENV)/.installed-$(shell sha256sum bench/requirements-triton.lock | cut -c1-12)

$(TRITON_INSTALLED): bench/requirements-triton.lock
	@{ $(TRITON_PYTHON) -c 'import ensurepip' && ldconfig -p | grep -q 'libpython3\.11\.so\.1\.0'; } >/dev/null 2>&1 || { \
		echo "installing Debian's python3.11, python3.11-venv and libpython3.11 for the Triton contender"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv libpython3.11; }
	@grep -qx 'home = /usr/bin' $(TRITON_VENV)/pyvenv.cfg 2>/dev/null || { rm -rf $(TRITON_VENV) && $(TRITON_PYTHON) -m venv $(TRITON_VENV); }
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip
	$(call PIP_LOCKED,$(TRITON_VENV)/bin/python) -r bench/requirements-triton.lock
	@rm -f $(TRITON_VENV)/.installed-* && touch $@

# make bench-tune searches every contender's setup alike (bench/results/bench_tuning.json, committed); make bench,
# make bench-quick (the engine phase) and make bench-eager (every member eager) measure with it (docs/benchmarks.md).
bench: build $(BENCH_INSTALLED) $(TRITON_INSTALLED)
	$(PY) -m bench.run

bench-quick: build $(BENCH_INSTALLED) $(TRITON_INSTALLED)
	$(PY) -m bench.run --quick

bench-tune: build $(BENCH_INSTALLED) $(TRITON_INSTALLED)
	$(PY) -m bench.search

bench-eager: build $(BENCH_INSTALLED) $(TRITON_INSTALLED)
	$(PY) -m bench.run --variants eager

bench-mlp: $(BENCH_INSTALLED)
	$(PY) -m bench.mlp_table

bench-profile: $(INSTALLED)
	$(PY) -m bench.cpu_profile $(PROFILE_ARGS)

bench-batching: demo
	$(PY) -m bench.batching_defaults

bench-fused: $(INSTALLED)
	$(PY) -m bench.fused_members

bench-inputs: demo
	$(PY) -m bench.parallel_inputs

bench-plans: demo
	$(PY) -m bench.execution_plans

# Every engine and precision per member of the trio and the demos, one thread, next to this machine's peak.
bench-engines: demo
	$(PY) -m bench.engines

# Where a 16-image request's time goes in our worker (decode, resize, members, render), on `shapes`.
bench-request-profile: demo
	$(PY) -m bench.request_profile

bench-metrics: demo $(BENCH_INSTALLED)
	$(PY) -m bench.metrics_cost

bench-options: demo
	$(PY) -m bench.answer_options

# Exact early exit under any and all against running every member, and what uncertainty=true costs, on shapes.
bench-early-exit: demo
	$(PY) -m bench.early_exit

# One member of shapes slowed by 200 ms on 10% of the images: p50/p99 at 1 and 8 clients with deadline_ms=50 against
# no deadline, in alternating rounds, and the accuracy it costs; DEADLINE_ARGS=--quick for a short smoke run.
bench-deadline: demo $(BENCH_INSTALLED)
	$(PY) -m bench.deadline $(DEADLINE_ARGS)

# The demos trained without and with the pinned kernels under two CPUs' kernel choices: digests and training time.
bench-pinned-training: $(INSTALLED) $(EVAL_INSTALLED)
	$(PY) -m bench.pinned_training $(PINNED_ARGS)

# plan: auto against each fixed plan (frozen, onnxruntime, openvino), served: the trio and shapes at two batchings and
# three loads, digits and faces at their shipped batching; AUTO_ARGS=--quick for shorter rounds.
bench-auto: demo $(BENCH_INSTALLED)
	$(PY) -m bench.auto_plans $(AUTO_ARGS)

# On a machine with CUDA: plans chosen there, answers against the CPU's, v2 and JSON in one batch, timings.
gpu-check: $(INSTALLED)
	$(PY) -m bench.gpu_check bench/results/gpu_check.json --part plans
	$(PY) -m bench.gpu_check bench/results/gpu_answer_options.json --part options

bench-floor: $(BENCH_INSTALLED)
	$(PY) -m bench.request_floor

# make tune NAME=shapes [TUNE_ARGS='--quick --write']: sweep workers, batch size and delay on a private TorchServe.
tune: demo $(BENCH_INSTALLED) $(TUNE_INSTALLED)
	$(PY) -m bench.tune $(NAME) $(TUNE_ARGS)

reliability: $(INSTALLED)
	$(PY) -m bench.reliability

reliability-full: $(INSTALLED)
	$(PY) -m bench.reliability --full

clean:
	rm -rf artifacts logs build model_store/*.mar key_file.json
