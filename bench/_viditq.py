"""Import the repository root as the package `viditq` from a bench script (as ComfyUI imports it from
custom_nodes/; the package uses relative imports, so it needs a package name)."""
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def import_viditq():
    if "viditq" not in sys.modules:
        spec = importlib.util.spec_from_file_location("viditq", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["viditq"] = module
        spec.loader.exec_module(module)
    return sys.modules["viditq"]
