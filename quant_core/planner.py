"""Mixed-precision planner: metric-decoupled sensitivity sweep and bit allocation (pure torch, no ComfyUI).

Sweep. One FP16 reference run records every model call. Then, for every unit (a layer, or with granularity
"block" the layers of one group in one block) and every timestep range, one sampling run drops only that unit
to the low precision (fake quant, QuantLinear.set_simulate) only in that range; every other layer and range
stays FP16. The calls before the range are the reference's (cached, not recomputed). The unit's sensitivity in
that range is the damage of its group's own metric (sensitivity.METRIC_OF_GROUP): cross-attention by the text
alignment proxy, self-attention and MLP by visual fidelity, temporal attention by temporal consistency. All
metrics are measured on every trial (the heat map shows them), only the own one is used. Runs:
1 + units x visited ranges (+ 1 uniform low-bit run, + 1 for the plan, + 1 per random baseline, on the kernels).

Normalisation. Metrics have different units, so each damage is divided by the damage of the same metric for
the uniform low-bit model (all layers low in all ranges): a score of 0.1 means "this unit alone causes a tenth
of what uniform W4 does to its metric". Scores of different groups are then comparable.

Allocation ("within each group the most sensitive first"). Items are units (per-layer plan; score summed over
ranges) or (unit, range) pairs (per-timestep-range plan). The extra budget above all-low is shared by the groups
in proportion to their summed scores (water-filling: a group that cannot use its share passes the rest on);
inside each group items get the high bits in decreasing score order while they fit in the group's share. A final
pass over all remaining items, again by decreasing score, spends what the shares left over, so that no further
item fits: the budget is never exceeded and met as closely as the item sizes allow. Ties break by model order;
the whole planner is deterministic for a seed (which only drives the random-allocation baseline).

External scorers (PlannerSettings.scorers, metric -> damage(reference Trace, test Trace)) replace a metric's
built-in proxy everywhere the sweep uses it: every trial, the uniform low-bit normaliser, hence the allocation;
their report numbers (an optional `metrics(ref, test)`) join the evaluation, and the plan, the heat map and the
report name the scorer of every metric (sensitivity.ClipScoreScorer / ImageScorer build them from a VAE and a
CLIP model; the ComfyUI node takes them from ViDiT-Q CLIP Scorer / Image Scorer).

Budgets. "avg_bits": parameter-weighted average weight bits, per model call (so a per-range plan counts each
range by the number of sampling steps in it). "memory_gb": bytes of stored quantized weights (10^9 bytes per
GB) with their scales; a per-range plan that uses both bit widths for a layer stores both.
"""
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .apply import _switch_layer, replace_layers
from .calibration import CalibrationData, bucket_edges
from .config import QuantConfig
from .plan import QuantPlan
from .quant_linear import QuantLinear, RangeClock, TimestepSwitchLinear, range_clock_of
from .sensitivity import (BUILT_IN_DAMAGE, METRIC_OF_GROUP, METRIC_TITLES, METRICS, TraceSession, Trace, all_metrics,
                          damages, headline, render_heatmap, scorer_label, scorer_metrics)

log = logging.getLogger("vidit_q")

BUDGET_UNITS = ("avg_bits", "memory_gb")
GRANULARITIES = ("layer", "block")
Runner = Callable[[Dict[str, nn.Module], TraceSession], torch.Tensor]
Decode = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Unit:
    """What the sweep drops to low precision at once, and the allocation gives bits to."""

    name: str
    group: str
    metric: str
    layers: List[str]
    params: int


def describe_scorers(metrics, scorers: Dict[str, Callable]) -> Dict[str, str]:
    """metric -> what scores it: "external: <the scorer's label>" or the built-in proxy's description."""
    return {m: (f"external: {scorer_label(scorers[m])}" if m in scorers else BUILT_IN_DAMAGE[m]) for m in metrics}


@dataclass
class PlannerSettings:
    budget: float = 5.0
    budget_unit: str = "avg_bits"
    timestep_ranges: int = 4
    per_range: bool = False  # one plan per timestep range (layers switch bits) instead of one per layer
    granularity: str = "layer"
    high_bits: int = 8
    seed: int = 0
    random_baselines: int = 1  # random allocations of the same budget, evaluated for the report
    evaluate: bool = True  # run the plan (and the baselines) on the kernel path for the report
    num_timesteps: float = 1000.0
    metric_of_group: Dict[str, str] = field(default_factory=dict)  # overrides of METRIC_OF_GROUP
    backend: str = "auto"
    # external scorers: metric -> damage(reference Trace, test Trace) >= 0 replacing the built-in proxy (e.g. a
    # CLIPScore drop on trace.images for "text"); used for the sweep, the normaliser and the allocation
    scorers: Dict[str, Callable[[Trace, Trace], float]] = field(default_factory=dict)

    def damages(self, ref: Trace, test: Trace, scorers: Optional[Dict[str, Callable]] = None) -> Dict[str, float]:
        """The built-in damages with the external scorers' in place of theirs (scorers: default self.scorers)."""
        d = damages(ref, test)
        for metric, scorer in (self.scorers if scorers is None else scorers).items():
            value = float(scorer(ref, test))
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"the external {metric} scorer ({scorer_label(scorer)}) returned {value}")
            d[metric] = max(0.0, value)
        return d

    def check(self, low: QuantConfig) -> None:
        problems = []
        if self.budget_unit not in BUDGET_UNITS:
            problems.append(f"budget_unit must be one of {BUDGET_UNITS}")
        if self.granularity not in GRANULARITIES:
            problems.append(f"granularity must be one of {GRANULARITIES}")
        if self.timestep_ranges < 1:
            problems.append("timestep_ranges must be >= 1")
        if not low.enabled or low.w_bits >= self.high_bits:
            problems.append(f"the low-precision preset must have fewer weight bits than {self.high_bits} "
                            f"(got {low.name!r} with {low.w_bits})")
        unknown = sorted(set(self.scorers) - set(METRICS))
        if unknown:
            problems.append(f"scorers are keyed by the metric they replace, one of {METRICS}; got {unknown}")
        problems += [f"the {m} scorer is not callable" for m, f in self.scorers.items() if not callable(f)]
        if self.budget_unit == "avg_bits" and not (low.w_bits <= self.budget):
            problems.append(f"an average of {self.budget} weight bits is below the low precision ({low.w_bits})")
        if problems:
            raise ValueError("invalid planner settings: " + "; ".join(problems))


@dataclass
class PlanResult:
    plan: QuantPlan
    units: List[Unit]
    metrics: List[str]  # metric families with a column in `damage`
    damage: torch.Tensor  # [units, metrics, ranges]: every metric's damage when only that unit is low there
    uniform_damage: Dict[str, float]
    score: torch.Tensor  # [units, ranges]: own-metric damage / uniform damage of that metric
    bits: torch.Tensor  # [units, ranges] chosen weight bits
    steps_per_range: List[int]
    evaluation: Dict
    seconds: float
    runs: int
    scorers: Dict[str, str] = field(default_factory=dict)  # metric -> its external scorer's label

    def heatmap(self) -> torch.Tensor:
        n = len(self.steps_per_range)
        edges = bucket_edges(n, self.plan.num_timesteps)
        labels = [f"r{r}" for r in range(n)]
        ranges = ", ".join(f"r{r}: t {int(edges[r])}-{int(edges[r + 1])}" for r in reversed(range(n)))
        uniform = torch.tensor([self.uniform_damage.get(m, 0.0) for m in self.metrics], dtype=torch.float64)
        rel = self.damage.double() / torch.where(uniform > 0, uniform, torch.ones_like(uniform))[None, :, None]
        b = self.plan.budget
        title = [f"ViDiT-Q plan: {b.get('achieved_avg_bits', 0):.3f} avg weight bits "
                 f"({b.get('target')} {b.get('unit')}), {b.get('memory_gb', 0):.4f} GB, "
                 f"{self.runs} runs, {self.seconds:.1f} s",
                 "cells: log damage of each metric (vs uniform low bits) when only this row is low in that "
                 f"timestep range ({ranges}); own metric bright"]
        for m in self.metrics:
            if m in self.scorers:
                title.append(f"{m}* scored by {self.scorers[m]} (external scorer, replaces the built-in proxy)")
        ev = self.evaluation
        if ev:
            def fmt(m):
                text = f"PSNR {m.get('latent_psnr_db', 0):.2f} dB, guidance cos {m.get('guidance_cosine', 0):.5f}"
                if "frame_diff_rel_err" in m:
                    text += f", frame-diff err {m['frame_diff_rel_err']:.4f}"
                for key, label, form in EXTERNAL_HEADLINE:
                    if key in m:
                        text += f", {label} {m[key]:{form}}"
                return text
            title.append(f"plan: {fmt(ev['plan'])} | uniform: {fmt(ev['uniform_low'])}")
        bits = self.bits if self.plan.range_layers else self.bits[:, :1]
        return render_heatmap([u.name for u in self.units], [u.group for u in self.units], self.metrics, rel,
                              [u.metric for u in self.units], bits, labels, title,
                              metric_labels=[m + "*" if m in self.scorers else m for m in self.metrics])

    def summary(self) -> Dict:
        return {"budget": self.plan.budget, "planner": self.plan.info.get("planner"),
                "evaluation": self.evaluation}


# report numbers of the external scorers shown next to the built-in ones: (key, label, format)
EXTERNAL_HEADLINE = (("clip_score", "CLIP score", ".2f"), ("scored_image_ssim", "SSIM", ".4f"),
                     ("scored_image_psnr_db", "image PSNR", ".2f"), ("clip_image_cosine", "CLIP image cos", ".5f"))


# -- units ----------------------------------------------------------------------------------------------------
def _block_of(name: str) -> str:
    """The block a layer belongs to: the name up to its first numeric component (blocks.3.attn.qkv -> blocks.3)."""
    m = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return m.group(1) if m else name


def make_units(layers: "OrderedDict[str, Tuple[nn.Linear, str]]", granularity: str = "layer",
               metric_of_group: Optional[Dict[str, str]] = None) -> List[Unit]:
    metric_of = {**METRIC_OF_GROUP, **(metric_of_group or {})}
    units: "OrderedDict[str, Unit]" = OrderedDict()
    for name, (linear, group) in layers.items():
        key = name if granularity == "layer" else f"{_block_of(name)}:{group}"
        if key not in units:
            units[key] = Unit(key, group, metric_of.get(group, "visual"), [], 0)
        units[key].layers.append(name)
        units[key].params += linear.weight.numel()
    return list(units.values())


# -- runners --------------------------------------------------------------------------------------------------
class TorchRunner:
    """Runs a plain-torch sampler with some of the model's layers swapped: sample_fn(model_fn, on_model_call)
    must sample with `model_fn` in place of the model and call on_model_call(timesteps, branches) before each
    model call (the standalone Euler sampler's hook), and return the final latent."""

    def __init__(self, model: nn.Module, sample_fn: Callable):
        self.model = model
        self.sample_fn = sample_fn

    @torch.no_grad()
    def __call__(self, modules: Dict[str, nn.Module], session: TraceSession) -> torch.Tensor:
        old = replace_layers(self.model, modules)  # no fusions: sweeps run simulated layers
        try:
            def model_fn(*args, **kwargs):
                return session.call(lambda: self.model(*args, **kwargs))

            return self.sample_fn(model_fn, session.set_step)
        finally:
            replace_layers(self.model, old)


# -- allocation -----------------------------------------------------------------------------------------------
def _code_bytes(params: int, bits: int) -> int:
    """Stored bytes of a weight's codes: int4 packs two per byte, 6/8-bit and fp8 take one byte each."""
    return params // 2 if bits == 4 else params


@dataclass
class Allocation:
    bits: torch.Tensor  # [units, ranges]
    used: int  # budget units spent (avg_bits: bit-params-steps; memory_gb: bytes)
    capacity: int
    achieved_avg_bits: float
    memory_bytes: int
    order: List[Tuple[int, Optional[int]]]  # items given the high bits, in the order they got them


class _Budget:
    """Exact integer cost model of one allocation problem."""

    def __init__(self, units: List[Unit], low: int, high: int, steps_per_range: List[int], unit: str,
                 budget: float, overhead: List[int]):
        self.units, self.low, self.high = units, low, high
        self.visited = [r for r, s in enumerate(steps_per_range) if s > 0]
        self.w = steps_per_range
        self.unit, self.overhead = unit, overhead
        self.total_params = sum(u.params for u in units)
        self.total_steps = sum(steps_per_range)
        if unit == "avg_bits":
            self.capacity = int(budget * self.total_params * self.total_steps + 1e-6)
        else:
            self.capacity = int(budget * 1e9 + 1e-3)

    def unit_cost(self, u: int, high: frozenset) -> int:
        n = self.units[u].params
        if self.unit == "avg_bits":
            return sum(n * (self.high if r in high else self.low) * self.w[r] for r in self.visited)
        ov = self.overhead[u]
        if not high:
            return ov + _code_bytes(n, self.low)
        if len(high) == len(self.visited):
            return ov + _code_bytes(n, self.high)
        return 2 * ov + _code_bytes(n, self.low) + _code_bytes(n, self.high)

    def avg_bits(self, state: List[frozenset]) -> float:
        tot = sum(self.units[u].params * sum((self.high if r in h else self.low) * self.w[r] for r in self.visited)
                  for u, h in enumerate(state))
        return tot / max(1, self.total_params * self.total_steps)

    def memory(self, state: List[frozenset]) -> int:
        saved, self.unit = self.unit, "memory_gb"
        try:
            return sum(self.unit_cost(u, h) for u, h in enumerate(state))
        finally:
            self.unit = saved


def allocate_bits(units: List[Unit], scores: torch.Tensor, low_bits: int, high_bits: int, budget: float,
                  budget_unit: str = "avg_bits", steps_per_range: Optional[List[int]] = None,
                  per_range: bool = False, overhead_bytes: Optional[List[int]] = None,
                  random_seed: Optional[int] = None) -> Allocation:
    """Give `high_bits` to the most sensitive items until the budget is met (see the module docstring).

    scores: [units, ranges] normalised sensitivities. random_seed: ignore the scores and shares, take the items in
    a random order (the baseline). Never exceeds the budget; stops only when no remaining item fits.
    """
    n_units, n_ranges = scores.shape
    steps_per_range = list(steps_per_range or [1] * n_ranges)
    cost = _Budget(units, low_bits, high_bits, steps_per_range, budget_unit, budget,
                   list(overhead_bytes or [0] * n_units))
    visited = cost.visited
    state = [frozenset() for _ in range(n_units)]
    used = sum(cost.unit_cost(u, state[u]) for u in range(n_units))
    if used > cost.capacity:
        need = used / 1e9 if budget_unit == "memory_gb" else float(low_bits)
        raise ValueError(f"the budget ({budget} {budget_unit}) is below what the all-{low_bits}-bit model needs "
                         f"({need:.6g} {budget_unit})")
    if per_range:
        items = [(u, r) for u in range(n_units) for r in visited]
        score = {(u, r): float(scores[u, r]) for u, r in items}
    else:
        items = [(u, None) for u in range(n_units)]
        score = {(u, None): float(scores[u, visited].sum()) for u in range(n_units)}

    def ranges_of(item):
        return frozenset(visited) if item[1] is None else frozenset([item[1]])

    def delta(item):
        u = item[0]
        return cost.unit_cost(u, state[u] | ranges_of(item)) - cost.unit_cost(u, state[u])

    order: List[Tuple[int, Optional[int]]] = []
    taken = set()

    def take(item, limit=None):
        nonlocal used
        d = delta(item)
        if used + d > cost.capacity or (limit is not None and d > limit):
            return 0, False
        state[item[0]] = state[item[0]] | ranges_of(item)
        used += d
        taken.add(item)
        order.append(item)
        return d, True

    def by_score(seq):
        return sorted(seq, key=lambda it: (-score[it], it[0], -1 if it[1] is None else it[1]))

    if random_seed is not None:
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(random_seed)).tolist()
        for i in perm:
            take(items[i])
    else:
        groups: "OrderedDict[str, List]" = OrderedDict()
        for it in items:
            groups.setdefault(units[it[0]].group, []).append(it)
        extra = cost.capacity - used
        weight = {g: sum(max(0.0, score[it]) for it in its) for g, its in groups.items()}
        room = {g: sum(cost.unit_cost(u, frozenset(visited)) - cost.unit_cost(u, frozenset())
                       for u in {it[0] for it in its}) for g, its in groups.items()}
        share = _water_fill(extra, weight, room)
        for g in sorted(groups, key=lambda g: (-weight[g], list(groups).index(g))):
            left = share[g]
            for it in by_score(groups[g]):
                d, ok = take(it, limit=left)
                if ok:
                    left -= d
        changed = True
        while changed:  # spend what the shares left: no remaining item may fit afterwards
            changed = False
            for it in by_score([it for it in items if it not in taken]):
                if take(it)[1]:
                    changed = True
    bits = torch.full((n_units, n_ranges), low_bits, dtype=torch.int64)
    for u, h in enumerate(state):
        for r in h:
            bits[u, r] = high_bits
    bits = _fill_unvisited(bits, visited)
    return Allocation(bits=bits, used=used, capacity=cost.capacity, achieved_avg_bits=cost.avg_bits(state),
                      memory_bytes=cost.memory(state), order=order)


def _water_fill(total: int, weight: Dict[str, float], room: Dict[str, int]) -> Dict[str, float]:
    """Split `total` in proportion to `weight`, no group above its `room`; what a full group cannot use goes on."""
    share = {g: 0.0 for g in weight}
    open_groups = [g for g in weight if room[g] > 0]
    left = float(total)
    while open_groups and left > 1e-9:
        w = {g: weight[g] for g in open_groups}
        wsum = sum(w.values())
        if wsum <= 0:
            w = {g: 1.0 for g in open_groups}
            wsum = float(len(open_groups))
        full = [g for g in open_groups if share[g] + left * w[g] / wsum >= room[g]]
        if not full:
            for g in open_groups:
                share[g] += left * w[g] / wsum
            break
        for g in full:
            left -= room[g] - share[g]
            share[g] = float(room[g])
            open_groups.remove(g)
    return share


def _fill_unvisited(bits: torch.Tensor, visited: List[int]) -> torch.Tensor:
    """Ranges no sampling step of the planning run fell in take the bits of the nearest visited range."""
    if not visited:
        return bits
    out = bits.clone()
    for r in range(bits.shape[1]):
        if r not in visited:
            nearest = min(visited, key=lambda v: (abs(v - r), v))
            out[:, r] = bits[:, nearest]
    return out


# -- the planner ----------------------------------------------------------------------------------------------
def plan_from_bits(units: List[Unit], bits: torch.Tensor, per_range: bool, fingerprint: Dict, base: QuantConfig,
                    settings: PlannerSettings) -> QuantPlan:
    layers, range_layers = {}, {}
    for u, unit in enumerate(units):
        row = [int(b) for b in bits[u]]
        for name in unit.layers:
            if per_range and len(set(row)) > 1:
                range_layers[name] = [{"w_bits": b} for b in row]
            else:
                layers[name] = {"w_bits": row[0]}
    return QuantPlan(fingerprint=fingerprint, layers=layers, base_preset=base.name,
                     timestep_ranges=settings.timestep_ranges if per_range else 1, range_layers=range_layers,
                     num_timesteps=settings.num_timesteps)


def kernel_modules(layers: "OrderedDict[str, Tuple[nn.Linear, str]]", base: QuantConfig, plan: Optional[QuantPlan],
                   calib: Optional[CalibrationData], backend: str = "auto") -> "OrderedDict[str, nn.Module]":
    """QuantLinear (kernel path, not simulated) or TimestepSwitchLinear for every layer, as build_quant_layers."""
    out: "OrderedDict[str, nn.Module]" = OrderedDict()
    clock = RangeClock(plan.timestep_ranges, plan.num_timesteps) if plan is not None and plan.range_layers else None
    for name, (linear, group) in layers.items():
        cfgs = plan.range_configs(name, base) if plan is not None else None
        if cfgs is not None:
            out[name] = _switch_layer(linear, name, cfgs, calib, backend, clock)[0]
        else:
            cfg = plan.config_for(name, base) if plan is not None else base
            absmax = calib.channel_absmax(name) if calib is not None else None
            out[name] = QuantLinear.from_linear(linear, name, cfg, absmax, backend)
        out[name].meta["group"] = group
    return out


@dataclass
class Sweep:
    """The expensive part of planning (sampling runs), reusable for other budgets / plan kinds."""

    units: List[Unit]
    metrics: List[str]
    damage: torch.Tensor  # [units, metrics, ranges]
    uniform_damage: Dict[str, float]
    uniform_metrics: Dict[str, float]
    score: torch.Tensor  # [units, ranges]
    steps_per_range: List[int]
    overhead: List[int]  # bytes of scales etc. per unit (the same at every bit width)
    reference: Trace
    fingerprint: Dict
    key: Tuple  # (low preset, timestep ranges, granularity, num_timesteps): what allocations must match
    runs: int
    seconds: float
    scorers: Dict[str, Callable] = field(default_factory=dict)  # the external scorers the damages came from


def _report(ref: Trace, trace: Trace, scorers: Dict[str, Callable]) -> Dict[str, float]:
    """The headline numbers of a run vs FP16: the built-in metrics and every external scorer's."""
    out = headline(all_metrics(ref, trace))
    for scorer in scorers.values():
        out.update(scorer_metrics(scorer, ref, trace))
    return out


def _run(runner: Runner, modules, session: TraceSession, decode: Optional[Decode]) -> Trace:
    final = runner(modules, session)
    return session.finish(final, decode(final) if decode is not None else None)


def sensitivity_sweep(layers: "OrderedDict[str, Tuple[nn.Linear, str]]", fingerprint: Dict, runner: Runner,
                      low: QuantConfig, calib: Optional[CalibrationData] = None,
                      settings: Optional[PlannerSettings] = None, decode: Optional[Decode] = None,
                      progress: Optional[Callable[[int, int], None]] = None) -> Sweep:
    """FP16 reference, one run per unit and visited timestep range, and the uniform low-bit run."""
    settings = settings or PlannerSettings()
    settings.check(low)
    low.replace(w_bits=settings.high_bits)  # the high-precision twin must be a valid config
    t_start = time.perf_counter()
    R, nt = settings.timestep_ranges, settings.num_timesteps
    units = make_units(layers, settings.granularity, settings.metric_of_group)
    runs = 0

    def run(modules, session) -> Trace:
        nonlocal runs
        runs += 1
        return _run(runner, modules, session, decode)

    # FP16 reference (every call kept: trials reuse the calls before their range)
    ref = run({}, TraceSession(R, nt, keep_outputs=True))
    steps_per_range = ref.steps_per_range(R)
    visited = [r for r in range(R) if steps_per_range[r] > 0]
    is_video = ref.final.ndim == 5
    for unit in units:
        if unit.metric == "temporal" and not is_video:
            log.warning("ViDiT-Q planner: %s is scored by temporal consistency but the latent has no frame axis; "
                        "using visual fidelity", unit.name)
            unit.metric = "visual"
    metrics = [m for m in METRICS if m != "temporal" or is_video]
    scorers = {m: f for m, f in settings.scorers.items() if m in metrics}
    for m in settings.scorers:
        if m not in metrics:
            log.warning("ViDiT-Q planner: the external %s scorer is not used: this model has no %s metric", m, m)
    for m, f in scorers.items():
        log.info("ViDiT-Q planner: %s scored by %s", METRIC_TITLES.get(m, m), scorer_label(f))

    # sweep switches: variant 0 = the FP linear, variant 1 = fake-quant low bits
    clock = RangeClock(R, nt)
    switches: "OrderedDict[str, TimestepSwitchLinear]" = OrderedDict()
    overhead = []
    for unit in units:
        ov = 0
        for name in unit.layers:
            linear = layers[name][0]
            absmax = calib.channel_absmax(name) if calib is not None else None
            q = QuantLinear.from_linear(linear, name, low, absmax, settings.backend)
            q.set_simulate(True)
            ov += q.weight_bytes() - q.qweight.numel() * q.qweight.element_size()
            switches[name] = TimestepSwitchLinear([linear, q], [0] * R, clock, name)
        overhead.append(ov)

    total_trials = len(units) * len(visited)
    damage = torch.zeros(len(units), len(metrics), R, dtype=torch.float64)
    done = 0
    for r in sorted(visited, reverse=True):  # noisiest first
        for ui, unit in enumerate(units):
            for name in unit.layers:
                switches[name].choice[r] = 1
            try:
                trace = run(switches, TraceSession(R, nt, clock, reference=ref, active_ranges=[r]))
            finally:
                for name in unit.layers:
                    switches[name].choice[r] = 0
            d = settings.damages(ref, trace, scorers)
            for mi, m in enumerate(metrics):
                damage[ui, mi, r] = d.get(m, 0.0)
            done += 1
            if progress is not None:
                progress(done, total_trials)
    del switches

    # uniform low bits on the kernel path: the normaliser of every metric, and the baseline of the report
    uniform = run(kernel_modules(layers, low, None, calib, settings.backend), TraceSession(R, nt))
    uniform_damage = settings.damages(ref, uniform, scorers)
    score = torch.zeros(len(units), R, dtype=torch.float64)
    for ui, unit in enumerate(units):
        mi = metrics.index(unit.metric)
        norm = uniform_damage.get(unit.metric, 0.0)
        score[ui] = damage[ui, mi] / norm if norm > 0 else damage[ui, mi]
    for m in {u.metric for u in units}:
        own = [ui for ui, u in enumerate(units) if u.metric == m]
        if uniform_damage.get(m, 0.0) <= 0 and float(damage[own, metrics.index(m)].max()) > 0:
            log.warning("ViDiT-Q planner: uniform low bits cause no %s damage (%s), so its units' scores are not "
                        "normalised and compare badly with the other metrics'", m,
                        describe_scorers([m], scorers)[m])
    return Sweep(units=units, metrics=metrics, damage=damage, uniform_damage=uniform_damage,
                 uniform_metrics=_report(ref, uniform, scorers), score=score,
                 steps_per_range=steps_per_range, overhead=overhead, reference=ref, fingerprint=fingerprint,
                 key=(low.name, R, settings.granularity, nt), runs=runs, seconds=time.perf_counter() - t_start,
                 scorers=scorers)


def allocate_plan(sweep: Sweep, layers: "OrderedDict[str, Tuple[nn.Linear, str]]", runner: Optional[Runner],
                  low: QuantConfig, calib: Optional[CalibrationData] = None,
                  settings: Optional[PlannerSettings] = None, decode: Optional[Decode] = None) -> PlanResult:
    """Bits for a budget from a sweep, the plan, and (settings.evaluate) the plan and random allocations of the
    same budget run on the kernel path against the sweep's FP16 reference (reported with the sweep's external
    scorers' numbers; settings.scorers is not used here: the scores are the sweep's)."""
    settings = settings or PlannerSettings()
    settings.check(low)
    key = (low.name, settings.timestep_ranges, settings.granularity, settings.num_timesteps)
    if key != sweep.key:
        raise ValueError(f"this sweep was made for (preset, ranges, granularity, timesteps) {sweep.key}, not {key}")
    t_start = time.perf_counter()
    R, nt = settings.timestep_ranges, settings.num_timesteps
    units, ref = sweep.units, sweep.reference
    runs = 0
    per_range = settings.per_range and R > 1
    alloc_args = dict(low_bits=low.w_bits, high_bits=settings.high_bits, budget=settings.budget,
                      budget_unit=settings.budget_unit, steps_per_range=sweep.steps_per_range,
                      per_range=per_range, overhead_bytes=sweep.overhead)
    alloc = allocate_bits(units, sweep.score, **alloc_args)
    plan = plan_from_bits(units, alloc.bits, per_range, sweep.fingerprint, low, settings)

    def evaluate(p: QuantPlan) -> Dict:
        nonlocal runs
        if runner is None:
            raise ValueError("evaluating a plan needs the runner")
        mods = kernel_modules(layers, low, p, calib, settings.backend)
        runs += 1
        trace = _run(runner, mods, TraceSession(R, nt, clock=range_clock_of(mods)), decode)
        return _report(ref, trace, sweep.scorers)

    evaluation = {}
    if settings.evaluate:
        evaluation["plan"] = {**evaluate(plan), "achieved_avg_bits": alloc.achieved_avg_bits}
        evaluation["uniform_low"] = {**sweep.uniform_metrics, "achieved_avg_bits": float(low.w_bits)}
        evaluation["random"] = []
        for i in range(settings.random_baselines):
            ra = allocate_bits(units, sweep.score, **alloc_args, random_seed=settings.seed + i)
            rplan = plan_from_bits(units, ra.bits, per_range, sweep.fingerprint, low, settings)
            evaluation["random"].append({**evaluate(rplan), "achieved_avg_bits": ra.achieved_avg_bits})
    alloc_seconds = time.perf_counter() - t_start
    seconds = sweep.seconds + alloc_seconds

    n_high = sum(len(unit.layers) for unit_bits, unit in zip(alloc.bits, units)
                 if int(unit_bits.max()) == settings.high_bits)
    plan.budget = {
        "unit": settings.budget_unit, "target": settings.budget, "low_bits": low.w_bits,
        "high_bits": settings.high_bits, "achieved_avg_bits": alloc.achieved_avg_bits,
        "memory_gb": alloc.memory_bytes / 1e9, "memory_bytes": alloc.memory_bytes,
        "layers_with_high_bits": n_high, "layers": len(layers), "capacity": alloc.capacity, "used": alloc.used,
    }
    plan.info = {
        "planner": {
            "granularity": settings.granularity, "timestep_ranges": R, "per_range_plan": per_range,
            "steps_per_range": sweep.steps_per_range, "units": len(units), "runs": sweep.runs + runs,
            "seconds": seconds, "sweep_seconds": sweep.seconds, "seed": settings.seed, "low_preset": low.name,
            "metric_of_group": {u.group: u.metric for u in units}, "uniform_damage": sweep.uniform_damage,
            "scorers": describe_scorers(sweep.metrics, sweep.scorers),
            "allocation": "groups share the extra budget in proportion to their summed normalised sensitivity; "
                          "within a group the most sensitive get the high bits first; leftovers by sensitivity",
        },
        "evaluation": evaluation,
        "sensitivity": {u.name: {"group": u.group, "metric": u.metric, "layers": u.layers,
                                 "score_by_range": [round(float(v), 6) for v in sweep.score[i]],
                                 "bits_by_range": [int(b) for b in alloc.bits[i]]}
                        for i, u in enumerate(units)},
    }
    log.info("ViDiT-Q planner: %d units, %d runs in %.1f s; %.3f avg weight bits (target %s %s)", len(units),
             sweep.runs + runs, seconds, alloc.achieved_avg_bits, settings.budget, settings.budget_unit)
    return PlanResult(plan=plan, units=units, metrics=sweep.metrics, damage=sweep.damage,
                      uniform_damage=sweep.uniform_damage, score=sweep.score, bits=alloc.bits,
                      steps_per_range=sweep.steps_per_range, evaluation=evaluation, seconds=seconds,
                      runs=sweep.runs + runs, scorers={m: scorer_label(f) for m, f in sweep.scorers.items()})


def plan_mixed_precision(layers: "OrderedDict[str, Tuple[nn.Linear, str]]", fingerprint: Dict, runner: Runner,
                         low: QuantConfig, calib: Optional[CalibrationData] = None,
                         settings: Optional[PlannerSettings] = None, decode: Optional[Decode] = None,
                         progress: Optional[Callable[[int, int], None]] = None) -> PlanResult:
    """Sweep, allocate, evaluate. layers: name -> (linear, group) as describe_model gives them; runner: how to
    sample with some layers swapped (TorchRunner for plain torch, the ComfyUI node's runner inside ComfyUI)."""
    sweep = sensitivity_sweep(layers, fingerprint, runner, low, calib, settings, decode, progress)
    return allocate_plan(sweep, layers, runner, low, calib, settings, decode)
