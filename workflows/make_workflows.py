#!/usr/bin/env python3
"""Writes the shared workflows in both ComfyUI formats from one description, so the twins never drift.

    python workflows/make_workflows.py          # rewrites workflows/*.json
UI format (litegraph, loads in the ComfyUI front end) and API format (headless /prompt) per workflow.
"""
import json
import pathlib
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

HERE = pathlib.Path(__file__).resolve().parent
SEEDED = {"seed"}  # widgets followed by the front end's control_after_generate value


@dataclass
class Node:
    id: int
    type: str
    pos: Tuple[int, int]
    widgets: List[Tuple[str, object]] = field(default_factory=list)
    inputs: List[Tuple[str, str, Optional[Tuple[int, int]]]] = field(default_factory=list)  # name, type, (src, slot)
    outputs: List[Tuple[str, str]] = field(default_factory=list)
    size: Tuple[int, int] = (320, 160)


def ui_format(nodes: List[Node]) -> dict:
    links, link_id = [], 0
    out_links = {(n.id, i): [] for n in nodes for i in range(len(n.outputs))}
    ui_nodes = []
    for order, n in enumerate(nodes):
        inputs = []
        for name, typ, src in n.inputs:
            lid = None
            if src is not None:
                link_id += 1
                lid = link_id
                links.append([lid, src[0], src[1], n.id, len(inputs), typ])
                out_links[src].append(lid)
            inputs.append({"name": name, "type": typ, "link": lid})
        widgets = []
        for name, value in n.widgets:
            widgets.append(value)
            if name in SEEDED:
                widgets.append("fixed")
        ui_nodes.append({"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {},
                         "order": order, "mode": 0, "inputs": inputs, "outputs": [],
                         "properties": {"Node name for S&R": n.type}, "widgets_values": widgets})
    for ui_node, n in zip(ui_nodes, nodes):
        ui_node["outputs"] = [{"name": name, "type": typ, "links": out_links[(n.id, i)], "slot_index": i}
                              for i, (name, typ) in enumerate(n.outputs)]
    return {"last_node_id": max(n.id for n in nodes), "last_link_id": link_id, "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def api_format(nodes: List[Node]) -> dict:
    api = {}
    for n in nodes:
        inputs = {name: value for name, value in n.widgets}
        inputs.update({name: [str(src[0]), src[1]] for name, _, src in n.inputs if src is not None})
        api[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.type}}
    return api


def _sampling(seed=0, steps=20, cfg=4.5):
    return [("seed", seed), ("steps", steps), ("cfg", cfg), ("sampler_name", "euler"), ("scheduler", "normal")]


def _pixart_inputs(prompt: str) -> List[Node]:
    """Nodes 1-6 of the PixArt workflows: stock loaders (DiT, T5, SDXL VAE), prompts, a 1024 px latent."""
    return [
        Node(1, "UNETLoader", (20, 40), [("unet_name", "PixArt-Sigma-XL-2-1024-MS.safetensors"),
                                         ("weight_dtype", "default")], outputs=[("MODEL", "MODEL")]),
        Node(2, "CLIPLoader", (20, 220), [("clip_name", "t5xxl_fp16.safetensors"), ("type", "pixart"),
                                          ("device", "default")], outputs=[("CLIP", "CLIP")]),
        Node(3, "CLIPTextEncode", (380, 40), [("text", prompt)], [("clip", "CLIP", (2, 0))],
             [("CONDITIONING", "CONDITIONING")]),
        Node(4, "CLIPTextEncode", (380, 240), [("text", "")], [("clip", "CLIP", (2, 0))],
             [("CONDITIONING", "CONDITIONING")]),
        Node(5, "EmptyLatentImage", (20, 420), [("width", 1024), ("height", 1024), ("batch_size", 1)],
             outputs=[("LATENT", "LATENT")]),
        Node(6, "VAELoader", (20, 600), [("vae_name", "sdxl_vae.safetensors")], outputs=[("VAE", "VAE")]),
    ]


def _graphs(node_id: int, pos, src: int) -> Node:
    """ViDiT-Q CUDA Graphs on MODEL `src`: the fast way to run a model (README, Speed); the compare workflows put it
    on both models, so the report's speed figures compare like with like."""
    return Node(node_id, "ViDiTQCudaGraphs", pos, [("max_graphs", 4)], [("model", "MODEL", (src, 0))],
                [("MODEL", "MODEL")], (320, 80))


PIXART_COND = [("positive", "CONDITIONING", (3, 0)), ("negative", "CONDITIONING", (4, 0)),
               ("latent_image", "LATENT", (5, 0))]


def _pixart_calibrated(preset: str) -> List[Node]:
    """Nodes 1-8 of the PixArt W8A8 workflows: the inputs, Calibrate (7) and Quantize DiT (8) with `preset`."""
    prompt = "a photo of a red fox sitting in fresh snow, detailed fur, soft morning light"
    return _pixart_inputs(prompt) + [
        Node(7, "ViDiTQCalibrate", (740, 40), _sampling() + [("timestep_buckets", 4)],
             [("model", "MODEL", (1, 0))] + PIXART_COND, [("calib", "VIDITQ_CALIB")], (320, 300)),
        Node(8, "ViDiTQQuantize", (740, 380), [("preset", preset), ("backend", "auto"), ("attention", "off")],
             [("model", "MODEL", (1, 0)), ("calib", "VIDITQ_CALIB", (7, 0)), ("plan", "VIDITQ_PLAN", None)],
             [("MODEL", "MODEL")]),
    ]


def pixart_w8a8_compare() -> List[Node]:
    cond = PIXART_COND
    return _pixart_calibrated("w8a8") + [
        _graphs(14, (740, 560), 1), _graphs(15, (740, 680), 8),
        Node(9, "ViDiTQQuantizedSampler", (1100, 40), _sampling() + [("denoise", 1.0)],
             [("model_fp", "MODEL", (14, 0)), ("model_q", "MODEL", (15, 0))] + cond + [("vae", "VAE", (6, 0))],
             [("latent_fp", "LATENT"), ("latent_q", "LATENT"), ("compare", "IMAGE"), ("report", "STRING")],
             (340, 420)),
        Node(10, "SaveImage", (1480, 40), [("filename_prefix", "vidit_q/w8a8_compare")],
             [("images", "IMAGE", (9, 2))], size=(500, 300)),
        Node(11, "KSampler", (1100, 520), _sampling() + [("denoise", 1.0)],
             [("model", "MODEL", (15, 0))] + cond, [("LATENT", "LATENT")], (320, 260)),
        Node(12, "VAEDecode", (1480, 420), inputs=[("samples", "LATENT", (11, 0)), ("vae", "VAE", (6, 0))],
             outputs=[("IMAGE", "IMAGE")]),
        Node(13, "SaveImage", (1480, 560), [("filename_prefix", "vidit_q/w8a8_ksampler")],
             [("images", "IMAGE", (12, 0))], size=(400, 300)),
    ]


def opensora_w8a8_compare() -> List[Node]:
    """OpenSORA 1.0 (16x512x512, IDDPM, SD VAE per frame): the official sampling settings (cfg 7, learned null
    caption as the negative), 20 steps as in ViDiT-Q's calibration; W8A8 compare + the quantized MODEL alone."""
    prompt = "a red fox running through fresh snow in a pine forest, slow motion, cinematic lighting"
    cond = [("positive", "CONDITIONING", (3, 0)), ("negative", "CONDITIONING", (4, 0)),
            ("latent_image", "LATENT", (5, 0))]
    return [
        Node(1, "ViDiTQOpenSoraLoader", (20, 40), [("ckpt_name", "OpenSora-v1-HQ-16x512x512.pth"), ("version", "auto"),
                                                   ("weight_dtype", "default"), ("text_kv", "quantize"),
                                                   ("space_scale", 0.0)], outputs=[("MODEL", "MODEL")],
             size=(320, 180)),
        Node(2, "CLIPLoader", (20, 260), [("clip_name", "t5xxl_fp16.safetensors"), ("type", "pixart"),
                                          ("device", "default")], outputs=[("CLIP", "CLIP")]),
        Node(3, "CLIPTextEncode", (380, 40), [("text", prompt)], [("clip", "CLIP", (2, 0))],
             [("CONDITIONING", "CONDITIONING")]),
        Node(4, "OpenSoraNullConditioning", (380, 260), inputs=[("model", "MODEL", (1, 0))],
             outputs=[("CONDITIONING", "CONDITIONING")], size=(320, 60)),
        Node(5, "EmptyOpenSoraLatent", (20, 440), [("width", 512), ("height", 512), ("frames", 16), ("batch_size", 1),
                                                   ("version", "1.0")], outputs=[("LATENT", "LATENT")],
             size=(320, 180)),
        Node(6, "VAELoader", (20, 660), [("vae_name", "vae-ft-ema-560000-ema-pruned.safetensors")],
             outputs=[("VAE", "VAE")]),
        Node(7, "ViDiTQCalibrate", (740, 40), _sampling(cfg=7.0) + [("timestep_buckets", 4)],
             [("model", "MODEL", (1, 0))] + cond, [("calib", "VIDITQ_CALIB")], (320, 300)),
        Node(8, "ViDiTQQuantize", (740, 380), [("preset", "w8a8"), ("backend", "auto"), ("attention", "off")],
             [("model", "MODEL", (1, 0)), ("calib", "VIDITQ_CALIB", (7, 0)), ("plan", "VIDITQ_PLAN", None)],
             [("MODEL", "MODEL")]),
        _graphs(14, (740, 560), 1), _graphs(15, (740, 680), 8),
        Node(9, "ViDiTQQuantizedSampler", (1100, 40), _sampling(cfg=7.0) + [("denoise", 1.0)],
             [("model_fp", "MODEL", (14, 0)), ("model_q", "MODEL", (15, 0))] + cond + [("vae", "VAE", (6, 0))],
             [("latent_fp", "LATENT"), ("latent_q", "LATENT"), ("compare", "IMAGE"), ("report", "STRING")],
             (340, 420)),
        Node(10, "ViDiTQSaveVideo", (1480, 40), [("filename_prefix", "vidit_q/opensora_w8a8_compare"), ("fps", 8.0),
                                                 ("format", "mp4")], [("images", "IMAGE", (9, 2))], size=(500, 300)),
        Node(11, "KSampler", (1100, 520), _sampling(cfg=7.0) + [("denoise", 1.0)],
             [("model", "MODEL", (15, 0))] + cond, [("LATENT", "LATENT")], (320, 260)),
        Node(12, "OpenSoraVAEDecode", (1480, 420), inputs=[("samples", "LATENT", (11, 0)), ("vae", "VAE", (6, 0))],
             outputs=[("frames", "IMAGE")]),
        Node(13, "ViDiTQSaveVideo", (1480, 560), [("filename_prefix", "vidit_q/opensora_w8a8"), ("fps", 8.0),
                                                  ("format", "mp4")], [("images", "IMAGE", (12, 0))], size=(400, 300)),
    ]


def pixart_w4a8_mp() -> List[Node]:
    """Mixed precision: Calibrate -> Planner (sensitivity sweep on a 512 px latent, 5.0 average weight bits) ->
    Quantize with the plan (W4A8 + W8A8 layers on the kernels) -> compare with FP16 at 1024 px; heat map saved."""
    prompt = "a photo of a red fox sitting in fresh snow, detailed fur, soft morning light"
    cond = [("positive", "CONDITIONING", (3, 0)), ("negative", "CONDITIONING", (4, 0))]
    return _pixart_inputs(prompt) + [
        Node(7, "ViDiTQCalibrate", (740, 40), _sampling() + [("timestep_buckets", 4)],
             [("model", "MODEL", (1, 0))] + cond + [("latent_image", "LATENT", (5, 0))],
             [("calib", "VIDITQ_CALIB")], (320, 300)),
        Node(14, "EmptyLatentImage", (380, 440), [("width", 512), ("height", 512), ("batch_size", 1)],
             outputs=[("LATENT", "LATENT")]),
        Node(8, "ViDiTQPlanner", (740, 380),
             _sampling() + [("budget", 5.0), ("budget_unit", "avg_bits"), ("timestep_ranges", 4),
                            ("per_range_plan", False), ("granularity", "block"), ("low_preset", "w4a8"),
                            ("filename_prefix", "vidit_q_plans/pixart_w4a8_mp")],
             [("model", "MODEL", (1, 0)), ("calib", "VIDITQ_CALIB", (7, 0))] + cond
             + [("latent_image", "LATENT", (14, 0)), ("vae", "VAE", (6, 0))],
             [("plan", "VIDITQ_PLAN"), ("sensitivity", "IMAGE"), ("plan_json", "STRING")], (340, 520)),
        Node(9, "ViDiTQQuantize", (1100, 380), [("preset", "w4a8"), ("backend", "auto"), ("attention", "off")],
             [("model", "MODEL", (1, 0)), ("calib", "VIDITQ_CALIB", (7, 0)), ("plan", "VIDITQ_PLAN", (8, 0))],
             [("MODEL", "MODEL")]),
        _graphs(15, (1100, 560), 1), _graphs(16, (1100, 680), 9),
        Node(10, "ViDiTQQuantizedSampler", (1100, 40), _sampling() + [("denoise", 1.0)],
             [("model_fp", "MODEL", (15, 0)), ("model_q", "MODEL", (16, 0))] + cond
             + [("latent_image", "LATENT", (5, 0)), ("vae", "VAE", (6, 0))],
             [("latent_fp", "LATENT"), ("latent_q", "LATENT"), ("compare", "IMAGE"), ("report", "STRING")],
             (340, 420)),
        Node(11, "SaveImage", (1480, 40), [("filename_prefix", "vidit_q/w4a8_mp_compare")],
             [("images", "IMAGE", (10, 2))], size=(500, 300)),
        Node(12, "SaveImage", (1480, 420), [("filename_prefix", "vidit_q/w4a8_mp_sensitivity")],
             [("images", "IMAGE", (8, 1))], size=(500, 400)),
    ]


def pixart_w8a8_fast() -> List[Node]:
    """The fast path (README, Speed): calibrated W8A8 SmoothQuant-style (unrotated: its producers and residual adds
    fuse into our kernels) -> ViDiT-Q CUDA Graphs -> stock KSampler. No compile: the first step of a size runs
    eagerly (our kernels tune), the second records, the rest replay (session 15: faster than compiling with
    reduce-overhead, 26.1 vs 27.2 ms per PixArt-Σ 1024 px call on an H200)."""
    cond = PIXART_COND
    return _pixart_calibrated("w8a8-smoothquant") + [
        _graphs(9, (740, 560), 8),
        Node(10, "KSampler", (1100, 40), _sampling() + [("denoise", 1.0)],
             [("model", "MODEL", (9, 0))] + cond, [("LATENT", "LATENT")], (320, 260)),
        Node(11, "VAEDecode", (1480, 40), inputs=[("samples", "LATENT", (10, 0)), ("vae", "VAE", (6, 0))],
             outputs=[("IMAGE", "IMAGE")]),
        Node(12, "SaveImage", (1480, 200), [("filename_prefix", "vidit_q/w8a8_fast")],
             [("images", "IMAGE", (11, 0))], size=(500, 400)),
    ]


WORKFLOWS = {"pixart_w8a8_compare": pixart_w8a8_compare, "opensora_w8a8_compare": opensora_w8a8_compare,
             "pixart_w4a8_mp": pixart_w4a8_mp, "pixart_w8a8_fast": pixart_w8a8_fast}


def render() -> dict:
    """file name -> JSON text for every shared workflow."""
    out = {}
    for name, build in WORKFLOWS.items():
        nodes = build()
        out[f"{name}.json"] = json.dumps(ui_format(nodes), indent=1) + "\n"
        out[f"{name}_api.json"] = json.dumps(api_format(nodes), indent=1) + "\n"
    return out


if __name__ == "__main__":
    for fname, text in render().items():
        (HERE / fname).write_text(text)
        print("wrote", HERE / fname)
