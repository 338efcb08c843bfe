"""Mixed-precision planner (quant_core/planner.py) on the tiny PixArt: sensitivity sweep, budget, plans, kernels."""
import json
import sys

import pytest
import torch

import conftest  # noqa: F401  (registers the package `viditq` when this file runs as a script)
from helpers import calibrate, noise, text_pair, tiny_pixart
from viditq import kernels
from viditq.quant_core import (FingerprintMismatch, PlannerSettings, QuantLinear, QuantPlan, RangeClock,
                               TimestepSwitchLinear, TorchRunner, allocate_bits, build_quant_layers, describe_model,
                               get_preset, range_clock_of, replace_layers)
from viditq.quant_core.planner import Unit, _Budget, allocate_plan, plan_from_bits, sensitivity_sweep
from viditq.quant_core.sensitivity import TraceSession, all_metrics, headline, ssim
from viditq.standalone.sampler import sample_euler_cfg

STEPS, RANGES, BUDGET, RANDOM_SEEDS = 4, 2, 5.0, (0, 1, 2)
LOW = get_preset("w4a8")


def sample_fn(steps=STEPS):
    cond, uncond = text_pair()
    x = noise()

    def fn(model_fn, hook):
        return sample_euler_cfg(model_fn, x, cond, uncond, steps, 4.5, on_model_call=hook)

    return fn


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on a shared 2-core machine OpenMP spinning makes every
    sampling run of the sweep up to 30x slower; restored for the other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def env(one_thread):
    model = tiny_pixart()
    calib = calibrate(model, steps=STEPS)
    _, _, layers, fp = describe_model(model)
    runner = TorchRunner(model, sample_fn())
    settings = PlannerSettings(budget=BUDGET, timestep_ranges=RANGES, granularity="layer", evaluate=False)
    sweep = sensitivity_sweep(layers, fp, runner, LOW, calib, settings)
    return dict(model=model, calib=calib, layers=layers, fp=fp, runner=runner, sweep=sweep, settings=settings)


def settings_like(env, **changes):
    s = env["settings"]
    d = dict(budget=s.budget, timestep_ranges=s.timestep_ranges, granularity=s.granularity, evaluate=False)
    d.update(changes)
    return PlannerSettings(**d)


def run_plan(env, plan):
    """Sample with the plan on the kernel path (build_quant_layers, as ViDiTQQuantize does) -> metrics vs FP16."""
    model = env["model"]
    q_layers, summary = build_quant_layers(model, LOW, env["calib"], plan)
    session = TraceSession(RANGES, clock=range_clock_of(q_layers))
    trace = session.finish(env["runner"](q_layers, session))
    return headline(all_metrics(env["sweep"].reference, trace)), q_layers, summary


def beats(a, b):
    """a is better than b on every metric of an image model (visual fidelity and text alignment)."""
    return (a["latent_psnr_db"] > b["latent_psnr_db"] and a["guidance_cosine"] > b["guidance_cosine"]
            and a["guidance_rel_err"] < b["guidance_rel_err"])


@pytest.mark.parametrize("per_range", [False, True], ids=["per_layer", "per_timestep_range"])
def test_mixed_plan_beats_uniform_and_random_allocations(env, per_range):
    settings = settings_like(env, per_range=per_range)
    result = allocate_plan(env["sweep"], env["layers"], env["runner"], LOW, env["calib"], settings)
    plan = result.plan
    assert plan.budget["achieved_avg_bits"] == BUDGET and plan.budget["used"] == plan.budget["capacity"]
    assert bool(plan.range_layers) == per_range
    mixed, q_layers, summary = run_plan(env, plan)
    uniform, _, _ = run_plan(env, None)
    assert beats(mixed, uniform), (mixed, uniform)
    args = dict(low_bits=4, high_bits=8, budget=BUDGET, steps_per_range=env["sweep"].steps_per_range,
                per_range=per_range, overhead_bytes=env["sweep"].overhead)
    for seed in RANDOM_SEEDS:
        rand = allocate_bits(env["sweep"].units, env["sweep"].score, **args, random_seed=seed)
        assert rand.achieved_avg_bits == BUDGET
        rplan = plan_from_bits(env["sweep"].units, rand.bits, per_range, env["fp"], LOW, settings)
        assert rplan.layers != plan.layers or rplan.range_layers != plan.range_layers
        random_metrics, _, _ = run_plan(env, rplan)
        assert beats(mixed, random_metrics), (seed, mixed, random_metrics)
    if per_range:
        assert any(isinstance(m, TimestepSwitchLinear) for m in q_layers.values())


def test_planner_reports_its_own_evaluation_and_time(env):
    settings = settings_like(env, evaluate=True, random_baselines=1)
    result = allocate_plan(env["sweep"], env["layers"], env["runner"], LOW, env["calib"], settings)
    ev, info = result.evaluation, result.plan.info["planner"]
    assert beats(ev["plan"], ev["uniform_low"]) and beats(ev["plan"], ev["random"][0])
    assert info["seconds"] > 0 and info["runs"] == env["sweep"].runs + 2
    # 1 reference + 14 layers x 2 ranges + 1 uniform: each trial recomputes only from its range on
    assert env["sweep"].runs == 1 + 14 * RANGES + 1
    assert set(info["metric_of_group"].items()) == {("self_attn", "visual"), ("mlp", "visual"),
                                                    ("cross_attn", "text")}
    summary = result.summary()
    json.dumps(summary)  # reports are plain JSON


def test_sweep_scores_each_group_by_its_own_metric(env):
    sweep = env["sweep"]
    assert sweep.metrics == ["visual", "text"] and sweep.damage.shape == (14, 2, RANGES)
    assert (sweep.damage >= 0).all() and (sweep.score.sum(1) > 0).all()
    for i, unit in enumerate(sweep.units):
        own = sweep.metrics.index(unit.metric)
        assert torch.allclose(sweep.score[i], sweep.damage[i, own] / sweep.uniform_damage[unit.metric])
    # the earlier (noisier) range reuses nothing; the later range reuses the reference's first calls
    assert sweep.steps_per_range == [2, 2]


def test_trials_reuse_the_reference_calls_before_their_range(env):
    sweep, model = env["sweep"], env["model"]
    clock = RangeClock(RANGES)
    name, (linear, _) = next(iter(env["layers"].items()))
    q = QuantLinear.from_linear(linear, name, LOW, env["calib"].channel_absmax(name))
    q.set_simulate(True)
    switch = TimestepSwitchLinear([linear, q], [1, 0], clock, name)  # low only in the clean range 0
    session = TraceSession(RANGES, clock=clock, reference=sweep.reference, active_ranges=[0])
    trace = session.finish(env["runner"]({name: switch}, session))
    assert trace.skipped_calls == 2 and trace.computed_calls == 2
    assert torch.equal(trace.steps[0].cond, sweep.reference.steps[0].cond)
    assert not torch.equal(trace.final, sweep.reference.final)
    # without the reference the same trial gives the same result (the skip is exact)
    session2 = TraceSession(RANGES, clock=clock, active_ranges=[0])
    trace2 = session2.finish(env["runner"]({name: switch}, session2))
    assert trace2.computed_calls == 4 and torch.allclose(trace2.final, trace.final, atol=1e-6)
    assert isinstance(getattr(model.blocks[0].attn, "qkv"), torch.nn.Linear)  # the model is restored


def test_mixed_bits_run_through_the_kernel_path(env, monkeypatch):
    result = allocate_plan(env["sweep"], env["layers"], None, LOW, env["calib"],
                           settings_like(env, per_range=True))
    seen = []
    real = kernels.quant_linear

    def spy(x, w, *args, **kwargs):
        seen.append(w.fmt)
        return real(x, w, *args, **kwargs)

    monkeypatch.setattr(kernels, "quant_linear", spy)
    metrics, q_layers, summary = run_plan(env, result.plan)
    leaves = [v for m in q_layers.values() for v in (m.variants if isinstance(m, TimestepSwitchLinear) else [m])]
    assert all(isinstance(v, QuantLinear) and not v.simulate for v in leaves)
    assert {"int4", "int8"} <= {v.w_fmt for v in leaves} and {"int4", "int8"} <= set(seen)
    assert summary["plan"]["timestep_ranges"] == RANGES and summary["plan"]["layers_switching_by_timestep"] > 0
    # without the sampler's timestep the switching layers refuse to guess
    old = replace_layers(env["model"], q_layers)
    try:
        with pytest.raises(RuntimeError, match="no timestep was set"):
            sample_fn()(env["model"], None)
        clock = range_clock_of(q_layers)
        out = sample_fn()(env["model"], clock.set_step)
    finally:
        replace_layers(env["model"], old)
    assert torch.isfinite(out).all()


def test_plan_json_round_trip_and_fingerprint(env):
    result = allocate_plan(env["sweep"], env["layers"], None, LOW, env["calib"], settings_like(env, per_range=True))
    plan = result.plan
    text = plan.to_json()
    again = QuantPlan.from_json(text)
    assert again == plan and again.to_json() == text
    assert again.range_layers and again.timestep_ranges == RANGES and again.fingerprint == env["fp"]
    legacy = json.loads(text)
    for k in ("timestep_ranges", "range_layers", "num_timesteps"):
        legacy.pop(k)
    assert QuantPlan.from_json(json.dumps(legacy)).timestep_ranges == 1  # plans of the first format still load
    with pytest.raises(FingerprintMismatch, match="different checkpoint"):
        build_quant_layers(tiny_pixart(seed=1), LOW, None, again)
    with pytest.raises(FingerprintMismatch, match="another model architecture"):
        build_quant_layers(tiny_pixart(depth=1), LOW, None, again)
    bad = json.loads(text)
    bad["range_layers"][next(iter(bad["range_layers"]))] = [{"w_bits": 8}]
    with pytest.raises(ValueError, match="timestep ranges"):
        QuantPlan.from_json(json.dumps(bad))


def test_memory_budget_matches_the_real_weight_bytes(env):
    full = allocate_plan(env["sweep"], env["layers"], None, LOW, env["calib"], settings_like(env))
    _, _, summary = run_plan(env, full.plan)
    target_gb = summary["weight_bytes_quantized"] / 1e9
    mem = allocate_plan(env["sweep"], env["layers"], None, LOW, env["calib"],
                        settings_like(env, budget=target_gb, budget_unit="memory_gb"))
    assert mem.plan.budget["memory_bytes"] <= round(target_gb * 1e9)
    _, _, mem_summary = run_plan(env, mem.plan)
    assert mem_summary["weight_bytes_quantized"] == mem.plan.budget["memory_bytes"]
    per_range = allocate_plan(env["sweep"], env["layers"], None, LOW, env["calib"],
                              settings_like(env, budget=target_gb, budget_unit="memory_gb", per_range=True))
    _, _, pr_summary = run_plan(env, per_range.plan)
    assert pr_summary["weight_bytes_quantized"] == per_range.plan.budget["memory_bytes"] <= round(target_gb * 1e9)


def test_heatmap_renders(env):
    result = allocate_plan(env["sweep"], env["layers"], None, LOW, env["calib"], settings_like(env, per_range=True))
    img = result.heatmap()
    assert img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == 3 and img.dtype == torch.float32
    assert img.shape[1] > 14 * 10 and img.shape[2] > 300
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert float(img.std()) > 0.05
    colours = torch.unique((img[0] * 255).round().reshape(-1, 3), dim=0)
    assert len(colours) > 20
    # the bits columns show both widths: blue-ish 4-bit cells and orange 8-bit cells
    assert any(c[2] > 120 and c[0] < 80 for c in colours.tolist()) and any(c[0] > 200 and c[2] < 80
                                                                           for c in colours.tolist())


def test_planning_is_deterministic(env):
    a = allocate_plan(env["sweep"], env["layers"], None, LOW, env["calib"], settings_like(env)).plan
    sweep2 = sensitivity_sweep(env["layers"], env["fp"], env["runner"], LOW, env["calib"], env["settings"])
    b = allocate_plan(sweep2, env["layers"], None, LOW, env["calib"], settings_like(env)).plan
    assert torch.equal(sweep2.damage, env["sweep"].damage)
    assert a.layers == b.layers and a.budget == b.budget


def test_an_external_scorer_replaces_a_built_in_proxy(env):
    """E.g. a CLIP model scoring text alignment: any damage(reference trace, test trace) replaces the proxy."""
    returned = []

    def scorer(ref, test):
        returned.append(float((test.final - ref.final).abs().mean()))
        return returned[-1]

    layers = {n: v for n, v in env["layers"].items() if ".cross_attn." in n}
    settings = PlannerSettings(timestep_ranges=1, evaluate=False, scorers={"text": scorer})
    sweep = sensitivity_sweep(layers, env["fp"], env["runner"], LOW, env["calib"], settings)
    assert len(returned) == len(layers) + 1  # every trial, then the uniform low-bit run
    text = sweep.metrics.index("text")
    assert sweep.damage[:, text, 0].tolist() == returned[:-1] and sweep.uniform_damage["text"] == returned[-1]


def test_bad_settings_are_clear_errors(env):
    with pytest.raises(ValueError, match="below the low precision"):
        PlannerSettings(budget=3.0).check(LOW)
    with pytest.raises(ValueError, match="fewer weight bits"):
        PlannerSettings().check(get_preset("w8a8"))
    with pytest.raises(ValueError, match="budget_unit"):
        PlannerSettings(budget_unit="bits").check(LOW)
    with pytest.raises(ValueError, match="sweep was made for"):
        allocate_plan(env["sweep"], env["layers"], None, LOW, env["calib"], settings_like(env, timestep_ranges=4))
    with pytest.raises(ValueError, match="below what the all-4-bit model needs"):
        allocate_plan(env["sweep"], env["layers"], None, LOW, env["calib"],
                      settings_like(env, budget=1e-6, budget_unit="memory_gb"))


# -- the allocation rule on synthetic problems ------------------------------------------------------------------
def synthetic(n=12, seed=0, equal=False):
    g = torch.Generator().manual_seed(seed)
    groups = ["self_attn", "cross_attn", "mlp"]
    sizes = [4096] * n if equal else [int(s) * 1024 for s in torch.randint(1, 9, (n,), generator=g)]
    units = [Unit(f"u{i}", groups[i % 3], "text" if i % 3 == 1 else "visual", [f"u{i}"], sizes[i])
             for i in range(n)]
    scores = torch.rand(n, 3, generator=g, dtype=torch.float64) ** 3
    return units, scores


def _check_tight(units, scores, alloc, per_range, steps, unit, budget, overhead):
    """Never above the budget, and no item left out would still fit."""
    assert alloc.used <= alloc.capacity
    visited = [r for r, s in enumerate(steps) if s > 0]
    items = [(u, r) for u in range(len(units)) for r in visited] if per_range else [(u, None) for u in
                                                                                     range(len(units))]
    for u, r in items:
        ranges = visited if r is None else [r]
        if all(int(alloc.bits[u, rr]) == 8 for rr in ranges):
            continue
        bits = alloc.bits.clone()
        for rr in ranges:
            bits[u, rr] = 8
        extra = _Budget(units, 4, 8, steps, unit, budget, overhead)
        state = [frozenset(r for r in visited if int(bits[i, r]) == 8) for i in range(len(units))]
        assert sum(extra.unit_cost(i, h) for i, h in enumerate(state)) > alloc.capacity


@pytest.mark.parametrize("per_range", [False, True])
@pytest.mark.parametrize("unit", ["avg_bits", "memory_gb"])
def test_allocation_respects_the_budget_exactly(per_range, unit):
    steps = [3, 0, 5]  # range 1 never sampled: copies a neighbour's bits and costs nothing
    for seed in range(4):
        units, scores = synthetic(seed=seed)
        overhead = [64 * (i + 1) for i in range(len(units))]
        total = sum(u.params for u in units)
        for budget in (4.0, 4.37, 5.0, 6.5, 7.99, 8.0):
            b = budget if unit == "avg_bits" else (total * budget / 8 + sum(overhead)) / 1e9
            alloc = allocate_bits(units, scores, 4, 8, b, unit, steps, per_range, overhead)
            assert set(alloc.bits.unique().tolist()) <= {4, 8}
            assert torch.equal(alloc.bits[:, 1], alloc.bits[:, 0]) or torch.equal(alloc.bits[:, 1], alloc.bits[:, 2])
            if unit == "avg_bits":
                assert alloc.achieved_avg_bits <= budget + 1e-12
            else:
                assert alloc.memory_bytes <= b * 1e9 + 1e-3
            _check_tight(units, scores, alloc, per_range, steps, unit, b, overhead)
            if budget == 8.0 and unit == "avg_bits":
                assert (alloc.bits == 8).all()


def test_equal_sized_units_meet_the_budget_exactly_and_most_sensitive_first():
    units, scores = synthetic(n=12, seed=3, equal=True)
    alloc = allocate_bits(units, scores, 4, 8, 5.0, "avg_bits", [1, 1, 1], per_range=False)
    assert alloc.achieved_avg_bits == 5.0 and int((alloc.bits[:, 0] == 8).sum()) == 3
    total = scores.sum(1)
    for group in ("self_attn", "cross_attn", "mlp"):
        idx = [i for i, u in enumerate(units) if u.group == group]
        high = [i for i in idx if int(alloc.bits[i, 0]) == 8]
        ranked = sorted(idx, key=lambda i: -float(total[i]))
        assert high == sorted(ranked[:len(high)]), group  # within a group: a prefix of the sensitivity ranking
    # a group with all the sensitivity takes the whole budget
    skewed = scores.clone()
    skewed[[i for i, u in enumerate(units) if u.group != "mlp"]] = 0.0
    alloc = allocate_bits(units, skewed, 4, 8, 5.0, "avg_bits", [1, 1, 1])
    assert {units[i].group for i in range(12) if int(alloc.bits[i, 0]) == 8} == {"mlp"}
    # deterministic, and the random baseline depends on its seed only
    assert torch.equal(allocate_bits(units, scores, 4, 8, 5.0).bits, allocate_bits(units, scores, 4, 8, 5.0).bits)
    r1 = allocate_bits(units, scores, 4, 8, 5.0, random_seed=1).bits
    assert torch.equal(r1, allocate_bits(units, scores, 4, 8, 5.0, random_seed=1).bits)


def test_ssim_proxy():
    a = torch.rand(1, 24, 24, 3, generator=torch.Generator().manual_seed(0))
    assert ssim(a, a) == pytest.approx(1.0)
    noisy = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert 0.0 < ssim(a, noisy) < 0.99


def report(steps: int = STEPS, ranges: int = RANGES, budget: float = BUDGET, seeds=RANDOM_SEEDS) -> None:
    """python tests/test_planner.py [steps ranges budget]: the mixed plans vs uniform W4A8 vs random allocations of
    the same budget on the test model, every number measured on the kernel path against FP16."""
    torch.set_num_threads(1)
    model = tiny_pixart()
    calib = calibrate(model, steps=steps)
    _, _, layers, fp = describe_model(model)
    runner = TorchRunner(model, sample_fn(steps))
    settings = PlannerSettings(budget=budget, timestep_ranges=ranges, evaluate=True, random_baselines=len(seeds))
    sweep = sensitivity_sweep(layers, fp, runner, LOW, calib, settings)
    print(f"tiny PixArt (hidden 256, depth 2), {steps} Euler steps, cfg 4.5, {ranges} timestep ranges, budget "
          f"{budget} avg weight bits; sweep: {sweep.runs} runs in {sweep.seconds:.1f} s")
    print(f"{'':26s} {'avg bits':>8s} {'latent PSNR dB':>14s} {'guidance cos':>12s} {'guidance rel err':>16s}")
    for per_range in (False, True):
        s = PlannerSettings(budget=budget, timestep_ranges=ranges, per_range=per_range, evaluate=True,
                            random_baselines=len(seeds), seed=seeds[0])
        ev = allocate_plan(sweep, layers, runner, LOW, calib, s).evaluation
        kind = "per-range" if per_range else "per-layer"
        rows = [(f"mixed ({kind})", ev["plan"])] + [(f"random #{i} ({kind})", r) for i, r in
                                                     enumerate(ev["random"])]
        if not per_range:
            rows.insert(1, ("uniform W4A8", ev["uniform_low"]))
        for label, m in rows:
            print(f"{label:26s} {m['achieved_avg_bits']:8.3f} {m['latent_psnr_db']:14.2f} "
                  f"{m['guidance_cosine']:12.5f} {m['guidance_rel_err']:16.4f}")


if __name__ == "__main__":
    report(*[t(a) for t, a in zip((int, int, float), sys.argv[1:])])
