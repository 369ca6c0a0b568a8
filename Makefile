# Thin wrappers over scripts/; every target sets up .venv first if needed.
.PHONY: setup demo test docs docs-serve bench

setup:
	bash scripts/setup.sh

demo:
	bash scripts/demo.sh $(ARGS)

test:
	bash scripts/test.sh

docs: setup
	NO_MKDOCS_2_WARNING=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/mkdocs build --strict

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/mkdocs serve

bench: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/adapter_bench.py
