"""ViDiTQPlanner / ViDiTQLoadPlan inside ComfyUI (in-process, tiny checkpoint): plan, save, load, quantize, run."""
import json

import pytest
import torch

from comfy_env import conditioning, import_comfyui, requires_comfyui, write_tiny_checkpoint
from viditq.quant_core import FingerprintMismatch, QuantLinear, QuantPlan, TimestepSwitchLinear

pytestmark = requires_comfyui


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import_comfyui()
    import comfy.sd
    import folder_paths

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_planner.one_thread
    out_dir = tmp_path_factory.mktemp("output")
    previous_out = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out_dir))
    from viditq.nodes.calibrate import ViDiTQCalibrate
    from viditq.nodes.planner import _SWEEP_CACHE, ViDiTQLoadPlan, ViDiTQPlanner
    from viditq.nodes.quantize import ViDiTQQuantize
    from viditq.nodes.sampler import ViDiTQQuantizedSampler

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("diffusion_models"))
    model = comfy.sd.load_diffusion_model(str(path))
    args = dict(positive=conditioning("a red cube"), negative=conditioning(""),
                latent_image={"samples": torch.zeros(1, 4, 40, 40)}, seed=3, steps=2, cfg=4.5,
                sampler_name="euler", scheduler="normal")
    (calib,) = ViDiTQCalibrate.execute(model, **args, timestep_buckets=2).args
    yield dict(model=model, args=args, calib=calib, out=out_dir, planner=ViDiTQPlanner, load=ViDiTQLoadPlan,
               quantize=ViDiTQQuantize, qsampler=ViDiTQQuantizedSampler, tmp=tmp_path_factory)
    _SWEEP_CACHE.clear()
    folder_paths.set_output_directory(previous_out)
    torch.set_num_threads(previous_threads)


def plan_args(per_range=False, budget=5.0):
    return dict(budget=budget, budget_unit="avg_bits", timestep_ranges=2, per_range_plan=per_range,
                granularity="block", low_preset="w4a8", filename_prefix="vidit_q_plans/test_plan")


def test_planner_node_plans_saves_and_the_plan_reloads(env):
    out = env["planner"].execute(env["model"], **env["args"], **plan_args(), calib=env["calib"])
    plan, heat, plan_json = out.args
    assert isinstance(plan, QuantPlan) and plan.fingerprint == env["calib"].fingerprint
    assert plan.budget["achieved_avg_bits"] == 5.0 and plan.budget["unit"] == "avg_bits"
    info = plan.info["planner"]
    assert info["units"] == 3 and info["runs"] == 1 + 3 * 2 + 1 + 2 and not info["sweep_reused"]
    ev = plan.info["evaluation"]
    assert ev["plan"]["latent_psnr_db"] > ev["uniform_low"]["latent_psnr_db"]
    assert QuantPlan.from_json(plan_json) == plan
    assert heat.ndim == 4 and heat.shape[-1] == 3 and float(heat.std()) > 0.05
    assert "images" in out.ui and "plan" in out.ui["text"][0]
    saved = list((env["out"] / "vidit_q_plans").glob("test_plan_*.json"))
    assert len(saved) == 1 and info["saved_to"] == saved[0].name
    from viditq.nodes.planner import plan_files

    assert saved[0].name in plan_files()
    loaded, summary = env["load"].execute(saved[0].name).args
    assert loaded == plan and json.loads(summary)["budget"]["achieved_avg_bits"] == 5.0
    env["plan"] = plan


def test_planned_model_runs_on_kernels_and_reports_the_plan(env):
    plan = env["plan"]
    (model_q,) = env["quantize"].execute(env["model"], "w4a8", env["calib"], plan, "auto").args
    patched = [v for v in model_q.object_patches.values() if isinstance(v, QuantLinear)]
    assert {q.w_fmt for q in patched} == {"int4", "int8"} and not any(q.simulate for q in patched)
    report = json.loads(env["qsampler"].execute(env["model"], model_q, **env["args"], denoise=1.0).args[3])
    assert report["plan"]["budget"]["achieved_avg_bits"] == 5.0 and report["plan"]["base_preset"] == "w4a8"
    # the planner measured the same kernel-path model against the same FP16 run
    assert report["psnr_db"] == pytest.approx(plan.info["evaluation"]["plan"]["latent_psnr_db"], abs=0.01)


def test_per_range_plan_reuses_the_sweep_and_switches_by_timestep(env):
    import nodes

    out = env["planner"].execute(env["model"], **env["args"], **plan_args(per_range=True, budget=5.5),
                                   calib=env["calib"])
    plan = out.args[0]
    assert plan.info["planner"]["sweep_reused"] and plan.timestep_ranges == 2
    assert plan.budget["achieved_avg_bits"] == 5.5
    (model_q,) = env["quantize"].execute(env["model"], "w4a8", env["calib"], plan, "auto").args
    assert plan.range_layers, plan.info["sensitivity"]
    assert any(isinstance(v, TimestepSwitchLinear) for v in model_q.object_patches.values())
    a = env["args"]
    (latent,) = nodes.common_ksampler(model_q, a["seed"], a["steps"], a["cfg"], a["sampler_name"], a["scheduler"],
                                      a["positive"], a["negative"], a["latent_image"])
    assert torch.isfinite(latent["samples"]).all()


def test_plan_for_another_model_is_a_clear_error(env):
    import comfy.sd

    other = comfy.sd.load_diffusion_model(str(write_tiny_checkpoint(env["tmp"].mktemp("other"), seed=7)))
    with pytest.raises(FingerprintMismatch, match="mixed-precision plan"):
        env["quantize"].execute(other, "w4a8", None, env["plan"], "auto")
    (model_q,) = env["quantize"].execute(env["model"], "w4a8", None, None, "auto").args
    with pytest.raises(ValueError, match="already quantized"):
        env["planner"].execute(model_q, **env["args"], **plan_args())
