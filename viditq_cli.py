#!/usr/bin/env python3
"""ComfyUI-ViDiT-Q from the command line (no ComfyUI needed).

    python viditq_cli.py demo --out out/demo     # calibrate, quantize with several presets, compare, report
"""
import argparse
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent
PACKAGE = "viditq"


def _import_package():
    """Import this folder as the package `viditq` (its modules use relative imports, as in custom_nodes/)."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="viditq_cli.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the whole pipeline on the built-in tiny PixArt")
    demo.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/demo"))
    demo.add_argument("--presets", default=None, help="comma-separated preset names (default: a useful set)")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--cfg", type=float, default=4.5)
    demo.add_argument("--latent-size", type=int, default=32, help="latent height = width (image = 8x)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    _import_package()
    from viditq.standalone.pipeline import DEFAULT_PRESETS, format_table, run_demo

    presets = [p.strip() for p in args.presets.split(",")] if args.presets else list(DEFAULT_PRESETS)
    try:
        report = run_demo(args.out, presets, steps=args.steps, cfg=args.cfg, latent_size=args.latent_size,
                          seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"wrote {args.out / 'compare.png'} and {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
