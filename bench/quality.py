#!/usr/bin/env python3
"""The quality table: every preset on every evaluation model (CPU is enough for these sizes).

    python bench/quality.py [--steps 20] [--presets a,b,...]
writes bench/results/quality.json ({"command", "rows": [{model, preset, psnr_db, alignment, fidelity, temporal}]})
and bench/results/quality.png, and prints the table. Numbers are what they are: nothing here is tuned to a result.
"""
import argparse
import json
import os
import pathlib
import sys

from PIL import Image, ImageDraw

ROOT = pathlib.Path(__file__).resolve().parents[1]
from _viditq import import_viditq  # noqa: E402  (bench/_viditq.py, beside this script)

import_viditq()

from viditq.evaluation.quality import PRESETS, evaluate, evaluation_models, to_device  # noqa: E402


def plot(rows, path: pathlib.Path) -> None:
    models = list(dict.fromkeys(r["model"] for r in rows))
    presets = list(dict.fromkeys(r["preset"] for r in rows if r["preset"] != "fp16"))
    bar, gap, h = 22, 8, 240
    width = 160 + len(presets) * (bar + gap)
    img = Image.new("RGB", (width, len(models) * (h + 40) + 20), "white")
    d = ImageDraw.Draw(img)
    top = max(min(r["psnr_db"], 80) for r in rows if r["preset"] != "fp16")
    for mi, m in enumerate(models):
        y0 = 20 + mi * (h + 40)
        d.text((8, y0), f"{m}: PSNR vs FP16 (dB, capped at 80)", fill="black")
        for pi, p in enumerate(presets):
            r = next((r for r in rows if r["model"] == m and r["preset"] == p), None)
            x = 150 + pi * (bar + gap)
            if r is None:
                continue
            v = min(r["psnr_db"], 80)
            bh = int((h - 60) * v / top)
            d.rectangle([x, y0 + h - 30 - bh, x + bar, y0 + h - 30], fill=(60, 110, 200))
            d.text((x, y0 + h - 44 - bh), f"{v:.0f}", fill="black")
            d.text((x, y0 + h - 24 + (pi % 2) * 10), p[:9], fill="black")
    img.save(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the models are small; cuda is just faster)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    ap.add_argument("--models", default=None, help="comma-separated subset: seeded-pixart,seeded-stdit,toy-pixart,toy-stdit")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other models' rows of an existing quality.json (and record both commands)")
    args = ap.parse_args()
    presets = [p for p in args.presets.split(",") if p]
    rows = []
    for em in evaluation_models(args.models.split(",") if args.models else None):
        to_device(em, args.device)
        print(f"{em.name}:")
        rows += evaluate(em, presets, steps=args.steps)
    out = pathlib.Path(args.out) if args.out else ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    backend = os.environ.get("VIDITQ_BACKEND", "")
    command = (f"VIDITQ_BACKEND={backend} " if backend else "") + "python bench/quality.py " + " ".join(sys.argv[1:])
    command = command.strip()
    if args.merge and (out / "quality.json").exists():
        old = json.loads((out / "quality.json").read_text())
        mine = {r["model"] for r in rows}
        rows = [r for r in old["rows"] if r["model"] not in mine] + rows
        command = f"{old['command']}  +  {command}"
    (out / "quality.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    plot(rows, out / "quality.png")
    print(f"\n{'model':44s} {'preset':18s} {'PSNR dB':>8s} {'align %':>8s} {'fid dB':>7s} {'temp dB':>8s}")
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{r['model']:44s} {r['preset']:18s} {r['psnr_db']:8.2f} {fmt(r['alignment'], '8.1f'):>8s} "
              f"{fmt(r['fidelity'], '7.2f'):>7s} {fmt(r['temporal'], '8.2f'):>8s}")


if __name__ == "__main__":
    main()
