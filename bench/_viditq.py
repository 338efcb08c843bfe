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


def capture_graph(fn):
    """(CUDA graph of fn, fn's output inside it): fn runs twice on a side stream first (tuners, lazy setup), which
    waits for the caller's queued work, then once under capture."""
    import torch

    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(st)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def graph_replay_ms(fn, rep: int = 50) -> float:
    """Median GPU time (ms) of fn replayed from a CUDA graph: the kernels alone, no Python / launch overhead."""
    import triton

    g, _ = capture_graph(fn)
    return triton.testing.do_bench(g.replay, warmup=10, rep=rep, return_mode="median")
