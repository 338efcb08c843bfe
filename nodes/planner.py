"""ViDiTQPlanner (metric-decoupled mixed-precision search inside ComfyUI sampling) and ViDiTQLoadPlan."""
import json
import logging
import os

from comfy_api.latest import io, ui

from ..quant_core import COND, UNCOND, PRESETS, QuantPlan, describe_model, get_preset
from ..quant_core.fingerprint import check_fingerprint
from ..quant_core.planner import (BUDGET_UNITS, EXTERNAL_HEADLINE, GRANULARITIES, PlannerSettings, allocate_plan,
                                  sensitivity_sweep)
from ..quant_core.sensitivity import METRIC_TITLES
from .comfy_glue import PREFIX, diffusion_model, ensure_not_quantized, fp_lookup, ksample
from .scorer_glue import check_scorer_for, vae_decoder
from .types import CalibType, PlanType, ScorerType, sampling_inputs

log = logging.getLogger("vidit_q")
PLAN_FOLDER = "vidit_q_plans"  # models/vidit_q_plans and output/vidit_q_plans (where the Planner saves)
LOW_PRESETS = [n for n, c in PRESETS.items() if c.enabled and c.w_bits < 8]


def plan_folders():
    """Register (idempotently) and return the folders ViDiTQLoadPlan lists, as ComfyUI does for checkpoints."""
    import folder_paths

    for path in (os.path.join(folder_paths.models_dir, PLAN_FOLDER),
                 os.path.join(folder_paths.get_output_directory(), PLAN_FOLDER)):
        folder_paths.add_model_folder_path(PLAN_FOLDER, path)
    paths = folder_paths.get_folder_paths(PLAN_FOLDER)
    folder_paths.folder_names_and_paths[PLAN_FOLDER] = (paths, {".json"})
    return paths


def plan_files():
    import folder_paths

    plan_folders()
    return folder_paths.get_filename_list(PLAN_FOLDER)


def save_plan(plan: QuantPlan, filename_prefix: str) -> str:
    """Write the plan JSON under the output folder (temp file + rename; the plan records the file name)."""
    import folder_paths

    out_dir = folder_paths.get_output_directory()
    folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}_{counter:05}_.json")
    plan.info.setdefault("planner", {})["saved_to"] = os.path.basename(path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(plan.to_json())
    os.replace(tmp, path)
    return path


class ComfyRunner:
    """One planner sampling run = one stock KSampler run of a clone whose layers are object-patched, wrapped
    like ViDiTQCalibrate's: the unet function wrapper reads cond_or_uncond and model_sampling.timestep(sigma)."""

    def __init__(self, model, sampling: dict):
        self.model = model
        self.sampling = sampling
        self.model_sampling = model.get_model_object("model_sampling")
        self.session = None
        self._cached = (None, None)  # (modules, clone): the sweep reuses one clone for every trial

    def _clone_for(self, modules):
        if self._cached[0] is modules:
            return self._cached[1]
        work = self.model.clone()
        for name, module in modules.items():
            work.add_object_patch(PREFIX + name, module)
        previous = work.model_options.get("model_function_wrapper")

        def wrapper(apply_model, args):
            x, sigma, cond_or_uncond = args["input"], args["timestep"], args["cond_or_uncond"]
            rows = x.shape[0] // max(1, len(cond_or_uncond))
            branches = [COND if c == 0 else UNCOND for c in cond_or_uncond for _ in range(rows)]
            self.session.set_step(self.model_sampling.timestep(sigma), branches)
            if previous is not None:
                return self.session.call(lambda: previous(apply_model, args))
            return self.session.call(lambda: apply_model(x, sigma, **args["c"]))

        work.set_model_unet_function_wrapper(wrapper)
        self._cached = (modules, work)
        return work

    def release(self) -> None:
        """Drop the cached clone (and the layers it patches in)."""
        self._cached = (None, None)
        self.session = None

    def __call__(self, modules, session):
        work = self._clone_for(modules)
        self.session = session
        s = self.sampling
        out, _ = ksample(work, s["seed"], s["steps"], s["cfg"], s["sampler_name"], s["scheduler"], s["positive"],
                         s["negative"], s["latent_image"])
        return out["samples"]


class _SweepCache:
    """The last sensitivity sweep: changing only the budget, the unit or the plan kind re-allocates without
    sampling again. Upstream objects are compared by identity (ComfyUI hands over the same objects while the
    nodes feeding them are unchanged) and kept referenced so identities cannot be reused."""

    def __init__(self):
        self.entry = None

    def get(self, objects, values):
        if self.entry is None:
            return None
        objs, vals, sweep = self.entry
        if vals == values and len(objs) == len(objects) and all(a is b for a, b in zip(objs, objects)):
            return sweep
        return None

    def put(self, objects, values, sweep) -> None:
        self.entry = (objects, values, sweep)

    def clear(self) -> None:
        self.entry = None


_SWEEP_CACHE = _SweepCache()


def _summary_text(result) -> str:
    b, info, ev = result.plan.budget, result.plan.info["planner"], result.evaluation
    lines = [f"ViDiT-Q plan ({info['low_preset']} + W{b['high_bits']}): {b['achieved_avg_bits']:.3f} average "
             f"weight bits for a budget of {b['target']} {b['unit']} ({b['memory_gb']:.3f} GB of weights); "
             f"{b['layers_with_high_bits']}/{b['layers']} layers at {b['high_bits']} bits"
             + (" in some timestep range" if info["per_range_plan"] else ""),
             f"{info['units']} units ({info['granularity']}) x {info['timestep_ranges']} timestep ranges, "
             f"{info['runs']} sampling runs, {info['seconds']:.1f} s"
             + (" (sensitivity sweep reused)" if info.get("sweep_reused") else "")]
    lines += [f"{METRIC_TITLES.get(m, m)}: {how}" for m, how in info.get("scorers", {}).items()]
    if ev:
        lines.append("vs FP16          latent PSNR dB   guidance cosine   guidance rel. err")
        rows = [("plan", ev["plan"]), ("uniform low", ev["uniform_low"])]
        rows += [(f"random #{i + 1}", r) for i, r in enumerate(ev.get("random", []))]
        for label, m in rows:
            extra = "".join(f"   {name} {m[key]:{form}}" for key, name, form in
                            (("image_ssim", "SSIM", ".4f"),) + EXTERNAL_HEADLINE if key in m)
            lines.append(f"{label:16s} {m.get('latent_psnr_db', 0):14.2f} {m.get('guidance_cosine', 0):17.5f} "
                         f"{m.get('guidance_rel_err', 0):19.4f}" + extra)
    return "\n".join(lines)


class ViDiTQPlanner(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ViDiTQPlanner",
            display_name="ViDiT-Q Mixed-Precision Planner",
            category="ViDiT-Q",
            description="Finds which layers need 8-bit weights: samples once in FP16, then once per layer (or "
                        "block) and timestep range with only that part at low bits, scores cross-attention by "
                        "text alignment (the CFG guidance direction, or a CLIP score with a text_scorer), "
                        "self-attention/MLP by visual fidelity (the latent, or decoded pictures with a VAE or a "
                        "visual_scorer), and gives 8 bits to the most sensitive until the budget is met.",
            inputs=[
                io.Model.Input("model", tooltip="The FP16 PixArt model (from UNETLoader)."),
                CalibType.Input("calib", optional=True, tooltip="From ViDiT-Q Calibrate: plans with the same "
                                "smoothing ViDiT-Q Quantize will use."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image", tooltip="Smaller latents plan faster; the plan applies to any."),
                *sampling_inputs(),
                io.Float.Input("budget", default=5.0, min=0.0, max=1e6, step=0.05, round=0.001,
                               tooltip="Average weight bits (parameter-weighted), or GB of quantized weights."),
                io.Combo.Input("budget_unit", options=list(BUDGET_UNITS), default="avg_bits"),
                io.Int.Input("timestep_ranges", default=4, min=1, max=16,
                             tooltip="Equal ranges of the timestep axis measured separately (runs grow with it)."),
                io.Boolean.Input("per_range_plan", default=False,
                                 tooltip="Let a layer use different bits in different timestep ranges (stores "
                                         "both weight copies of such layers)."),
                io.Combo.Input("granularity", options=list(GRANULARITIES), default="block",
                               tooltip="block: one run per block and layer group (fast); layer: one per linear."),
                io.Combo.Input("low_preset", options=LOW_PRESETS, default="w4a8",
                               tooltip="The low precision; the sensitive layers get the same config at 8 bits."),
                io.Vae.Input("vae", optional=True, tooltip="Score visual fidelity on decoded images (SSIM)."),
                io.String.Input("filename_prefix", default="vidit_q_plans/pixart_plan", optional=True,
                                tooltip="Save the plan JSON under output/ (empty: do not save); "
                                        "ViDiT-Q Load Plan lists output/vidit_q_plans and models/vidit_q_plans."),
                ScorerType.Input("text_scorer", optional=True,
                                 tooltip="From ViDiT-Q CLIP Scorer: scores text alignment (cross-attention) by the "
                                         "CLIP score of the decoded pictures instead of the guidance-direction "
                                         "proxy."),
                ScorerType.Input("visual_scorer", optional=True,
                                 tooltip="From ViDiT-Q Image Scorer: scores visual fidelity (self-attention, MLP) on "
                                         "decoded pictures instead of the built-in proxy (replaces the SSIM of "
                                         "the vae input too)."),
            ],
            outputs=[
                PlanType.Output(display_name="plan"),
                io.Image.Output(display_name="sensitivity"),
                io.String.Output(display_name="plan_json"),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, budget,
                budget_unit, timestep_ranges, per_range_plan, granularity, low_preset, calib=None, vae=None,
                filename_prefix="vidit_q_plans/pixart_plan", text_scorer=None, visual_scorer=None) -> io.NodeOutput:
        ensure_not_quantized(model, "ViDiT-Q Planner")
        scorers = {}
        for metric, socket, scorer in (("text", "text_scorer", text_scorer), ("visual", "visual_scorer",
                                                                                visual_scorer)):
            if scorer is not None:
                check_scorer_for(scorer, metric, socket, latent_image["samples"])
                scorers[metric] = scorer
        low = get_preset(low_preset)
        _, variant, layers, fingerprint = describe_model(diffusion_model(model), fp_lookup(model))
        if calib is not None:
            check_fingerprint(calib.fingerprint, fingerprint, "calibration")
        runner = ComfyRunner(model, dict(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                                         scheduler=scheduler, positive=positive, negative=negative,
                                         latent_image=latent_image))
        decode = None
        if vae is not None and "visual" in scorers:  # the scorer decodes for itself: one VAE decode per run, not two
            log.info("ViDiT-Q Planner: visual_scorer is connected, so the planner's own vae input is not used")
        elif vae is not None:
            decode = vae_decoder(vae, "ViDiT-Q Planner")
        ms = model.get_model_object("model_sampling")
        settings = PlannerSettings(budget=budget, budget_unit=budget_unit, timestep_ranges=timestep_ranges,
                                   per_range=per_range_plan, granularity=granularity, seed=seed,
                                   num_timesteps=float(getattr(ms, "num_timesteps", 1000)), scorers=scorers)
        step = {"next": 0.1}

        def progress(done, total):
            if done / total >= step["next"] or done == total:
                log.info("ViDiT-Q planner: %d/%d sensitivity runs", done, total)
                step["next"] = done / total + 0.1

        key_objects = (model, positive, negative, latent_image, calib, vae, text_scorer, visual_scorer)
        key_values = (seed, steps, cfg, sampler_name, scheduler, timestep_ranges, granularity, low_preset,
                      json.dumps(fingerprint, sort_keys=True))
        sweep = _SWEEP_CACHE.get(key_objects, key_values)
        reused = sweep is not None
        try:
            if sweep is None:
                sweep = sensitivity_sweep(layers, fingerprint, runner, low, calib, settings, decode, progress)
                _SWEEP_CACHE.put(key_objects, key_values, sweep)
            else:
                log.info("ViDiT-Q planner: reusing the sensitivity sweep of the previous run (only the budget or "
                         "the plan kind changed)")
            result = allocate_plan(sweep, layers, runner, low, calib, settings, decode)
        finally:
            runner.release()
        plan = result.plan
        plan.info["planner"]["sweep_reused"] = reused
        plan.info["planner"].update({"variant": variant, "sampler_name": sampler_name, "scheduler": scheduler,
                                     "steps": steps, "cfg": cfg, "latent_shape": list(latent_image["samples"].shape),
                                     "calibrated": calib is not None, "image_metrics": vae is not None})
        if filename_prefix:
            path = save_plan(plan, filename_prefix)
            log.info("ViDiT-Q: plan saved to %s", path)
        heat = result.heatmap()
        text = _summary_text(result)
        log.info("%s", text)
        preview = ui.PreviewImage(heat, cls=cls).as_dict()
        return io.NodeOutput(plan, heat, plan.to_json(), ui={**preview, "text": (text,)})


class ViDiTQLoadPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ViDiTQLoadPlan",
            display_name="ViDiT-Q Load Plan",
            category="ViDiT-Q",
            description="Loads a saved mixed-precision plan (JSON from ViDiT-Q Planner) from models/vidit_q_plans "
                        "or output/vidit_q_plans, to quantize again without re-planning.",
            inputs=[io.Combo.Input("plan_file", options=plan_files(),
                                   tooltip="Plans in models/vidit_q_plans and output/vidit_q_plans.")],
            outputs=[PlanType.Output(display_name="plan"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, plan_file) -> io.NodeOutput:
        import folder_paths

        plan_folders()
        path = folder_paths.get_full_path(PLAN_FOLDER, plan_file)
        if path is None:
            raise ValueError(f"ViDiT-Q plan {plan_file!r} not found in {', '.join(plan_folders())}")
        with open(path) as f:
            plan = QuantPlan.from_json(f.read())
        summary = json.dumps({"file": plan_file, "base_preset": plan.base_preset, "budget": plan.budget,
                              "timestep_ranges": plan.timestep_ranges, "fingerprint": plan.fingerprint}, indent=1)
        return io.NodeOutput(plan, summary)

    @classmethod
    def fingerprint_inputs(cls, plan_file):
        import folder_paths

        path = folder_paths.get_full_path(PLAN_FOLDER, plan_file)
        return os.path.getmtime(path) if path else plan_file
