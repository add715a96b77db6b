# One command runs the main job on the embedded demo model, one runs the tests; both install what
# they need into .venv. torch is installed first, pinned, so no dependency pulls a CUDA build.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moebits quantize --model demo --method fri --quantizer gptq --bits 3.25 --out runs/demo --overwrite
	$(VENV)/bin/moebits report runs/demo --out runs/demo/report
	@echo "open runs/demo/report/report.html (or read runs/demo/report/report.md)"

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
