#!/usr/bin/env python3
"""Entry point for the toy-model training on a GPU machine: imports the repo as `viditq`, then trains.

    python bench/run_train_toy.py --out OUT_DIR [--steps N]
"""
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("viditq", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
pkg = importlib.util.module_from_spec(spec)
sys.modules["viditq"] = pkg
spec.loader.exec_module(pkg)

from viditq.evaluation.train_toy import main  # noqa: E402

main()
