"""Replay a model call from a CUDA graph, one graph per input signature, without torch.compile.

A quantized DiT step launches a few hundred small kernels, and in eager mode the host (Python, Triton's launcher)
takes longer than the GPU. Capturing the call once and replaying it removes that cost. torch.compile's graph modes
do this too, but through Dynamo's guards and CUDA graph trees, whose per-call bookkeeping grows with the number of
tensors the model holds (measured on an H200, bench_e2e run 16: a quantized PixArt step at 512 px took 9.0 ms per
call through torch.compile(backend="cudagraphs"), 6.6 ms through this). Here a call costs the copies of its input tensors
into the graph's static buffers, one replay, and one copy of the output.

What makes a new graph (the signature): the shapes, dtypes, devices and strides of the tensor arguments (nested in
lists / tuples / dicts too) and the values of every other argument, which must be hashable. Tensor *values* are
copied in at each call; anything else the call reads (module attributes, Python state) is frozen at capture, which
is why a caller must only graph a model whose forward depends on its arguments alone. Calls that cannot be graphed
(CPU tensors, unhashable arguments, a capture already running, more signatures than `max_graphs`) run eagerly.
The first call of each signature runs eagerly (kernel tuning and device constants happen outside any capture); the
second captures; later ones replay.
"""
import logging
import threading

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

log = logging.getLogger("vidit_q")


class _Graph:
    """One captured call: its static input tensors (in flattening order), the graph, and its output."""

    def __init__(self, inputs, graph, out):
        self.inputs, self.graph = inputs, graph
        self.out_leaves, self.out_spec = tree_flatten(out)


class StepGraphs:
    """fn(*args, **kwargs) replayed from CUDA graphs. `stats` counts eager / captured / replayed calls.

    capture (tests): capture(run) -> (graph with .replay(), run's output), run a zero-argument function computing
    the call on the static inputs; by default a torch.cuda.CUDAGraph captured on a memory pool shared by all graphs
    of this wrapper (they never run at the same time), and replayed once for the capturing call's output."""

    def __init__(self, fn, max_graphs: int = 8, capture=None):
        self.fn = fn
        self.max_graphs = int(max_graphs)
        self.graphs = {}
        self.warmed = set()
        self.told = set()
        self.stats = {"eager": 0, "captured": 0, "replayed": 0}
        self._capture_fn = capture or self._capture_cuda
        self._cuda = capture is None
        self._pool = None
        self._lock = threading.Lock()

    def _capture_cuda(self, run):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):  # (on its own side stream, synchronized around)
            out = run()
        graph.replay()  # a capture only records: run it once for this call
        return graph, out

    @staticmethod
    def _signature(leaves):
        """(hashable key, indices of the tensor leaves), or (None, why the call cannot be graphed)."""
        key, tensor_idx, device = [], [], None
        for i, v in enumerate(leaves):
            if isinstance(v, torch.Tensor):
                device = v.device if device is None else device
                if v.device != device:
                    return None, f"tensors on {device} and {v.device}"
                key.append(("T", tuple(v.shape), tuple(v.stride()), v.dtype, str(v.device)))
                tensor_idx.append(i)
            else:
                try:
                    hash(v)
                except TypeError:
                    return None, f"an unhashable argument of type {type(v).__name__}"
                key.append(("V", type(v), v))
        return tuple(key), tensor_idx

    def _why_not(self, leaves, idx):
        """Why this call with a valid signature still runs eagerly (None: it can be graphed)."""
        if torch.is_grad_enabled() and any(leaves[i].requires_grad for i in idx):
            return "autograd is recording"
        if self._cuda:
            if not idx or leaves[idx[0]].device.type != "cuda":
                return "no CUDA tensor argument"
            if torch.cuda.is_current_stream_capturing():
                return "a CUDA graph capture is already running"
        return None

    def __call__(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        key, idx = self._signature(leaves)
        why = idx if key is None else self._why_not(leaves, idx)
        if why is not None:
            self._tell(why, logging.INFO)
            return self._eager(args, kwargs)
        key = (spec, key)
        with self._lock:
            entry = self.graphs.get(key)
            if entry is None:
                if key not in self.warmed:  # first call of a signature: eager (tuning, constants)
                    self.warmed.add(key)
                    return self._eager(args, kwargs)
                if len(self.graphs) >= self.max_graphs:
                    self._tell(f"more than {self.max_graphs} input signatures", logging.WARNING)
                    return self._eager(args, kwargs)
                entry = self._capture(leaves, spec, idx)
                self.graphs[key] = entry
                self.stats["captured"] += 1
            else:
                for dst, i in zip(entry.inputs, idx):
                    dst.copy_(leaves[i])
                entry.graph.replay()
                self.stats["replayed"] += 1
            # the output buffers are the graph's, overwritten by its next replay: the caller gets a copy
            out = [o.clone() if isinstance(o, torch.Tensor) else o for o in entry.out_leaves]
        return tree_unflatten(out, entry.out_spec)

    def _tell(self, why, level):
        if why not in self.told:
            self.told.add(why)
            log.log(level, "ViDiT-Q CUDA graphs: a call runs eagerly: %s", why)

    def _eager(self, args, kwargs):
        self.stats["eager"] += 1
        return self.fn(*args, **kwargs)

    def _capture(self, leaves, spec, idx):
        leaves = list(leaves)
        static = []
        for i in idx:  # the graph's input buffers, filled with this call's values
            leaves[i] = leaves[i].clone()
            static.append(leaves[i])
        args, kwargs = tree_unflatten(leaves, spec)
        graph, out = self._capture_fn(lambda: self.fn(*args, **kwargs))
        return _Graph(static, graph, out)
