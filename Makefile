# Set-up is part of every target: a Python 3.10 venv with the pinned lock file
# (docs/contracts.md §5).
PYTHON310 ?= $(shell pyenv root 2>/dev/null)/versions/3.10.13/bin/python
VENV := .venv
PY := $(VENV)/bin/python
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONHASHSEED := 0

OUTPUT ?= output
ITEMS ?= data/online_retail_sample/items.csv

.PHONY: run serve test lock clean

$(VENV)/.installed: requirements.lock setup.py
	@test -x $(PY) || { p="$(PYTHON310)"; [ -x "$$p" ] || p=$$(command -v python3.10); \
	  [ -n "$$p" ] || { echo "error: Python 3.10 not found (pyenv 3.10.13 or python3.10)"; exit 1; }; \
	  "$$p" -m venv $(VENV); }
	$(VENV)/bin/pip install -q uv==0.13.9
	$(VENV)/bin/uv pip sync -q --python $(PY) requirements.lock
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -e .
	@touch $@

# pipeline.py's exit status 3 (ran, not blessed) still runs the demo, which says why nothing
# was pushed; make then exits with the pipeline's status.
run: $(VENV)/.installed
	@$(PY) pipeline.py run --output $(OUTPUT) $(ARGS); status=$$?; \
	  [ $$status -eq 0 ] || [ $$status -eq 3 ] || exit $$status; \
	  $(PY) -m serving.demo --output $(OUTPUT) --items $(ITEMS) || exit $$?; exit $$status

# The local stand-in for tensorflow_model_server, on the latest pushed model (gRPC 8500, REST 8501).
serve: $(VENV)/.installed
	$(PY) -m serving.model_server --model_name=recommender \
	  --model_base_path=$(abspath $(OUTPUT))/serving/recommender --port=8500 --rest_api_port=8501

# Real-time personalization (serving/realtime): the local model server on the latest pushed model,
# redis-server when installed (else the embedded store), and the service on 127.0.0.1:8080
# (POST /events, GET /recommend?user=U). Ctrl-C stops all three.
REDIS_PORT ?= 6379
.PHONY: realtime
realtime: $(VENV)/.installed
	@base=$(abspath $(OUTPUT))/serving/recommender; \
	ls "$$base" 2>/dev/null | grep -q '^[0-9][0-9]*$$' || \
	  { echo "error: no pushed model under $$base (run make run first)"; exit 2; }; \
	pids=; trap 'kill $$pids 2>/dev/null; wait' EXIT; trap 'exit 130' INT TERM; \
	$(PY) -m serving.model_server --model_name=recommender --model_base_path=$$base \
	  --port=8500 --rest_api_port=8501 & pids=$$!; \
	if command -v redis-server >/dev/null; then \
	  mkdir -p $(abspath $(OUTPUT))/redis; \
	  redis-server --port $(REDIS_PORT) --bind 127.0.0.1 --dir $(abspath $(OUTPUT))/redis \
	    --appendonly yes --save '' --loglevel warning & pids="$$pids $$!"; \
	  store="--redis redis://127.0.0.1:$(REDIS_PORT)/0"; \
	else echo "redis-server is not installed: using the embedded store"; store=--embedded; fi; \
	$(PY) -m serving.realtime.service --model-server 127.0.0.1:8500 --items $(ITEMS) $$store \
	  --host 127.0.0.1 --port 8080

# The Redis tests need redis-server (Debian's package): installed when missing and root or sudo
# is at hand, else those tests skip with a warning.
test: $(VENV)/.installed
	@command -v redis-server >/dev/null || { s=; [ "$$(id -u)" = 0 ] || s="sudo -n"; \
	  $$s apt-get update -qq && $$s env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  redis-server >/dev/null; } || echo "warning: could not install redis-server (no root or \
	sudo?); the tests that need Redis will skip" >&2
	$(PY) -m pytest tests $(PYTEST_ARGS)

lock:
	$(VENV)/bin/uv pip compile --python $(PY) --python-version 3.10 requirements/requirements.in \
	  --override requirements/overrides.txt -o requirements.lock

clean:
	rm -rf $(OUTPUT)
