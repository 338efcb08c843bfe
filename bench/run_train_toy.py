#!/usr/bin/env python3
"""Entry point for the toy-model training on a GPU machine: imports the repo as `viditq`, then trains.

    python bench/run_train_toy.py --out OUT_DIR [--steps N]
"""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
from _viditq import import_viditq  # noqa: E402  (bench/_viditq.py, beside this script)

import_viditq()

from viditq.evaluation.train_toy import main  # noqa: E402

main()
