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


def pixart_w8a8_compare() -> List[Node]:
    prompt = "a photo of a red fox sitting in fresh snow, detailed fur, soft morning light"
    cond = [("positive", "CONDITIONING", (3, 0)), ("negative", "CONDITIONING", (4, 0)),
            ("latent_image", "LATENT", (5, 0))]
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
        Node(7, "ViDiTQCalibrate", (740, 40), _sampling() + [("timestep_buckets", 4)],
             [("model", "MODEL", (1, 0))] + cond, [("calib", "VIDITQ_CALIB")], (320, 300)),
        Node(8, "ViDiTQQuantize", (740, 380), [("preset", "w8a8"), ("backend", "auto")],
             [("model", "MODEL", (1, 0)), ("calib", "VIDITQ_CALIB", (7, 0)), ("plan", "VIDITQ_PLAN", None)],
             [("MODEL", "MODEL")]),
        Node(9, "ViDiTQQuantizedSampler", (1100, 40), _sampling() + [("denoise", 1.0)],
             [("model_fp", "MODEL", (1, 0)), ("model_q", "MODEL", (8, 0))] + cond + [("vae", "VAE", (6, 0))],
             [("latent_fp", "LATENT"), ("latent_q", "LATENT"), ("compare", "IMAGE"), ("report", "STRING")],
             (340, 420)),
        Node(10, "SaveImage", (1480, 40), [("filename_prefix", "vidit_q/w8a8_compare")],
             [("images", "IMAGE", (9, 2))], size=(500, 300)),
        Node(11, "KSampler", (1100, 520), _sampling() + [("denoise", 1.0)],
             [("model", "MODEL", (8, 0))] + cond, [("LATENT", "LATENT")], (320, 260)),
        Node(12, "VAEDecode", (1480, 420), inputs=[("samples", "LATENT", (11, 0)), ("vae", "VAE", (6, 0))],
             outputs=[("IMAGE", "IMAGE")]),
        Node(13, "SaveImage", (1480, 560), [("filename_prefix", "vidit_q/w8a8_ksampler")],
             [("images", "IMAGE", (12, 0))], size=(400, 300)),
    ]


WORKFLOWS = {"pixart_w8a8_compare": pixart_w8a8_compare}


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
