"""The shared API workflow, headless through a real ComfyUI server (its own executor), on a tiny checkpoint."""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from comfy_env import COMFYUI_PATH, TINY_CHECKPOINT, requires_comfyui, write_tiny_checkpoint
from viditq.models.opensora.tiny import save_tiny_opensora

pytestmark = requires_comfyui
ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
TINY_OPENSORA = "tiny-opensora-v1-16x512x512.safetensors"


def test_shared_workflows_match_their_generator():
    sys.path.insert(0, str(WORKFLOWS))
    try:
        import make_workflows
    finally:
        sys.path.remove(str(WORKFLOWS))
    for fname, text in make_workflows.render().items():
        assert (WORKFLOWS / fname).read_text() == text, f"{fname} is stale: run workflows/make_workflows.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"ComfyUI rejected the prompt: {e.read().decode()[:2000]}") from None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    custom = base / "custom_nodes"
    custom.mkdir()
    (custom / "ComfyUI-ViDiT-Q").symlink_to(ROOT, target_is_directory=True)
    (custom / "viditq_test_nodes").symlink_to(ROOT / "tests" / "comfy_test_nodes", target_is_directory=True)
    write_tiny_checkpoint(base / "models" / "diffusion_models")
    save_tiny_opensora(base / "models" / "opensora" / TINY_OPENSORA, "1.0", caption_channels=4096, token_num=120)
    port = _free_port()
    log = open(base / "server.log", "w")
    cmd = [sys.executable, "main.py", "--cpu", "--base-directory", str(base), "--listen", "127.0.0.1",
           "--port", str(port), "--disable-auto-launch"]
    proc = subprocess.Popen(cmd, cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            _get(url + "/system_stats")
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
    if proc.poll() is not None:
        pytest.fail("ComfyUI did not start:\n" + (base / "server.log").read_text()[-3000:])
    yield {"url": url, "log": base / "server.log", "output": base / "output"}
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _run_prompt(server, api: dict, timeout_s: float = 900) -> dict:
    """Queue an API-format prompt and wait for its history entry."""
    prompt_id = _post(server["url"] + "/prompt", {"prompt": api, "client_id": "vidit-q-test"})["prompt_id"]
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        hist = _get(f"{server['url']}/history/{prompt_id}")
        if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
            return hist[prompt_id]
        time.sleep(2)
    raise AssertionError("workflow did not finish:\n" + server["log"].read_text()[-3000:])


def _tiny_version_of(api: dict) -> dict:
    """Point the shared workflow at the tiny checkpoint, stand-in text features, 512 px, 2 steps, no VAE."""
    api = json.loads(json.dumps(api))
    for node_id, node in list(api.items()):
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "CLIPLoader" or ct == "VAELoader":
            del api[node_id]
        elif ct == "CLIPTextEncode":
            api[node_id] = {"class_type": "ViDiTQTestTextEncode", "inputs": {"text": inputs["text"]}}
        elif ct == "UNETLoader":
            inputs["unet_name"] = TINY_CHECKPOINT
        elif ct == "EmptyLatentImage":
            inputs.update(width=512, height=512, batch_size=1)
        elif ct == "VAEDecode":  # the stock-KSampler branch keeps its latent instead of decoding it
            api[node_id] = {"class_type": "SaveLatent",
                            "inputs": {"samples": inputs["samples"], "filename_prefix": "vidit_q/ksampler"}}
        if "steps" in inputs:
            inputs["steps"] = 2
        inputs.pop("vae", None)
    for node_id, node in list(api.items()):  # image savers fed by a removed decoder
        if node["class_type"] == "SaveImage" and api.get(node["inputs"]["images"][0], {}).get(
                "class_type") == "SaveLatent":
            del api[node_id]
    return api


def test_api_workflow_runs_headless_and_reports(server):
    api = _tiny_version_of(json.loads((WORKFLOWS / "pixart_w8a8_compare_api.json").read_text()))
    entry = _run_prompt(server, api)
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status)[:3000]
    sampler_id = next(k for k, v in api.items() if v["class_type"] == "ViDiTQQuantizedSampler")
    report = json.loads("".join(entry["outputs"][sampler_id]["text"]))
    assert report["preset"] == "w8a8" and report["quantization"]["calibrated"] is True
    assert report["psnr_db"] > 40 and 0.999 < report["cosine"] <= 1.0
    assert report["seconds_fp"] > 0 and report["seconds_q"] > 0 and report["ms_per_call_q"] > 0
    # both models of the comparison run through ViDiT-Q CUDA Graphs: the speed figures compare like with like
    graphed = {k for k, v in api.items() if v["class_type"] == "ViDiTQCudaGraphs"}
    assert {api[sampler_id]["inputs"]["model_fp"][0], api[sampler_id]["inputs"]["model_q"][0]} <= graphed
    saved = list((server["output"] / "vidit_q").glob("*"))
    assert any(p.suffix == ".png" for p in saved) and any(p.suffix == ".latent" for p in saved), saved


def test_fast_workflow_runs_headless(server):
    """The fast-path workflow (Quantize w8a8-smoothquant -> CUDA Graphs -> KSampler) on the tiny checkpoint (on the
    CPU the graphs node runs the model eagerly; tests/test_cuda_graphs_comfyui.py checks replays)."""
    api = _tiny_version_of(json.loads((WORKFLOWS / "pixart_w8a8_fast_api.json").read_text()))
    graphs_id = next(k for k, v in api.items() if v["class_type"] == "ViDiTQCudaGraphs")
    sampler = next(v for v in api.values() if v["class_type"] == "KSampler")
    assert sampler["inputs"]["model"] == [graphs_id, 0]  # the sampler runs the graphed MODEL
    entry = _run_prompt(server, api)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert list((server["output"] / "vidit_q").glob("ksampler*.latent"))


def _tiny_opensora_version_of(api: dict) -> dict:
    """The OpenSORA workflow on the tiny STDiT: stand-in text features, 128 px x 4 frames, 2 steps, no VAE (the
    quantized branch keeps its latent; the compare frames still go through ViDiTQSaveVideo)."""
    api = _tiny_version_of(api)
    for node_id, node in list(api.items()):
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "ViDiTQOpenSoraLoader":
            inputs["ckpt_name"] = TINY_OPENSORA
        elif ct == "EmptyOpenSoraLatent":
            inputs.update(width=128, height=128, frames=4, batch_size=1)
        elif ct == "OpenSoraVAEDecode":
            api[node_id] = {"class_type": "SaveLatent",
                            "inputs": {"samples": inputs["samples"], "filename_prefix": "vidit_q/opensora_ksampler"}}
    for node_id, node in list(api.items()):  # video savers fed by a removed decoder
        if node["class_type"] == "ViDiTQSaveVideo" and api.get(node["inputs"]["images"][0], {}).get(
                "class_type") == "SaveLatent":
            del api[node_id]
    return api


def test_opensora_api_workflow_runs_headless_and_reports(server):
    api = _tiny_opensora_version_of(json.loads((WORKFLOWS / "opensora_w8a8_compare_api.json").read_text()))
    entry = _run_prompt(server, api)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    sampler_id = next(k for k, v in api.items() if v["class_type"] == "ViDiTQQuantizedSampler")
    report = json.loads("".join(entry["outputs"][sampler_id]["text"]))
    assert report["preset"] == "w8a8" and report["quantization"]["calibrated"] is True
    assert report["quantization"]["variant"] == "opensora_v1_0"
    assert report["psnr_db"] > 40 and report["temporal"]["frames"] == 4
    assert 0 < report["temporal"]["frame_diff_rel_l2"] < 0.05
    saver_id = next(k for k, v in api.items() if v["class_type"] == "ViDiTQSaveVideo")
    video = entry["outputs"][saver_id]["images"][0]["filename"]
    saved = {p.name for p in (server["output"] / "vidit_q").glob("*")}
    assert video in saved and video.endswith((".mp4", ".webp")), saved
    assert any(name.startswith("opensora_ksampler") and name.endswith(".latent") for name in saved), saved


def test_mixed_precision_api_workflow_runs_headless_and_reports(server):
    """Calibrate -> Planner -> Quantize(plan) -> compare; the planner plans on a 320 px latent (ComfyUI's PixArt
    needs >= 320 px), the report carries the plan and the quality numbers."""
    api = _tiny_version_of(json.loads((WORKFLOWS / "pixart_w4a8_mp_api.json").read_text()))
    planner_id = next(k for k, v in api.items() if v["class_type"] == "ViDiTQPlanner")
    api[api[planner_id]["inputs"]["latent_image"][0]]["inputs"].update(width=320, height=320)
    entry = _run_prompt(server, api)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    sampler_id = next(k for k, v in api.items() if v["class_type"] == "ViDiTQQuantizedSampler")
    report = json.loads("".join(entry["outputs"][sampler_id]["text"]))
    assert report["preset"] == "w4a8" and report["quantization"]["calibrated"] is True
    budget = report["plan"]["budget"]
    assert budget["unit"] == "avg_bits" and budget["target"] == 5.0 and 4.0 < budget["achieved_avg_bits"] <= 5.0
    assert report["plan"]["base_preset"] == "w4a8" and 4.0 < report["quantization"]["mean_weight_bits"] < 8.0
    assert report["psnr_db"] > 30 and 0.99 < report["cosine"] <= 1.0
    planner_text = "".join(entry["outputs"][planner_id]["text"])
    assert "average weight bits" in planner_text and "latent PSNR" in planner_text
    assert entry["outputs"][planner_id]["images"], "the planner previews its heat map"
    plans = list((server["output"] / "vidit_q_plans").glob("pixart_w4a8_mp_*.json"))
    assert len(plans) == 1 and json.loads(plans[0].read_text())["budget"]["target"] == 5.0
    saved = {p.name for p in (server["output"] / "vidit_q").glob("*.png")}
    assert any(n.startswith("w4a8_mp_sensitivity") for n in saved) and any(n.startswith("w4a8_mp_compare")
                                                                         for n in saved), saved


def test_ui_workflows_have_one_widget_value_per_widget():
    """The front end maps widgets_values by position: a missing or extra value shifts every later widget."""
    from comfy_env import import_comfyui

    import_comfyui()
    from comfy_api.latest import io

    from viditq.nodes.extension import ViDiTQExtension
    import asyncio

    ours = {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(ViDiTQExtension().get_node_list())}
    widget_types = (io.Int, io.Float, io.String, io.Combo, io.Boolean)
    checked = 0
    for path in WORKFLOWS.glob("*.json"):
        if path.name.endswith("_api.json"):
            continue
        for node in json.loads(path.read_text())["nodes"]:
            cls = ours.get(node["type"])
            if cls is None:
                continue
            widgets = [i for i in cls.GET_SCHEMA().inputs if isinstance(i, tuple(t.Input for t in widget_types))]
            expected = len(widgets) + sum(1 for i in widgets if getattr(i, "control_after_generate", False))
            assert len(node["widgets_values"]) == expected, (path.name, node["type"], node["widgets_values"])
            checked += 1
    assert checked >= 5
