#!/usr/bin/env python3
"""Train the toy models on the procedural shape world (GPU, minutes): the PixArt-architecture text-to-image
model, or with --video the OpenSORA-1.0-architecture (STDiT) text-to-video model of moving shapes.

    python bench/run_train_toy.py --out DIR [--video] [--steps N] [--seed 0] [--max-seconds S]
        [--init-from auto|none|PATH] [--lr-decay none|cosine] [--batch B] [--eval-captions N]
eps-prediction on the discrete linear-beta schedule (PixArt's and OpenSORA 1.0's), 10% caption dropout for CFG,
AdamW + EMA; writes toy_pixart.safetensors or toy_stdit.safetensors (fp16 EMA weights + config metadata),
samples.png and train_log.json.

The video model starts, by default (--init-from auto), from the trained toy PixArt, as OpenSORA 1.0 starts from
PixArt-α: spatial weights copied, temporal attention output zeroed (toy_models.stdit_init_from_pixart), so
the first step already draws the caption's shape and colour at its start position in every frame and training
only has to learn the motion. Trained from scratch (the first toy STDiT, 200 s) it learned colour only.
"""
import argparse
import json
import math
import pathlib
import random
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..standalone.sampler import sample_euler_cfg
from .analyzers import alignment, temporal_smoothness, video_alignment
from .toy_models import (IMAGE_SIZE, TOY_PIXART_CONFIG, TOY_PIXART_FILE, TOY_STDIT_CONFIG, VIDEO_FRAMES,
                         build_toy_pixart, build_toy_stdit, caption_features, load_toy_pixart, null_features, spread,
                         stdit_init_from_pixart)
from .toy_world import all_image_scenes, all_video_scenes, render, render_video


def jittered_bank(scenes, variants: int, device, video: bool = False) -> torch.Tensor:
    """[len(scenes), variants, 3, S, S] ([.., 3, F, S, S] for video): each scene shifted by up to 2 px."""
    rng = random.Random(0)
    out = []
    for s in scenes:
        base = render_video(s, VIDEO_FRAMES, IMAGE_SIZE).transpose(0, 1) if video else render(s, IMAGE_SIZE)
        out.append(torch.stack([torch.roll(base, shifts=(rng.randint(-2, 2), rng.randint(-2, 2)), dims=(-2, -1))
                                for _ in range(variants)]))
    return torch.stack(out).to(device)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--video", action="store_true", help="train the STDiT text-to-video toy model")
    ap.add_argument("--max-seconds", type=float, default=1e9, help="stop training early after this long")
    ap.add_argument("--eval-captions", type=int, default=120, help="video captions scored after training")
    ap.add_argument("--init-from", default="auto",
                    help="video only: toy PixArt weights to start from (auto = evaluation/weights/toy_pixart"
                         ".safetensors when present; none = random init)")
    ap.add_argument("--lr-decay", choices=("none", "cosine"), default="none",
                    help="cosine: decay the learning rate to 10%% over --steps or --max-seconds, whichever ends "
                         "first")
    ap.add_argument("--variants", type=int, default=None,
                    help="jittered copies of each scene in the training bank (default 16 images, 8 videos)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    scenes = all_video_scenes() if args.video else all_image_scenes()
    bank = jittered_bank(scenes, args.variants or (8 if args.video else 16), dev, args.video)
    feats = caption_features(scenes).to(dev)
    null = null_features(1).to(dev)
    build, config = (build_toy_stdit, TOY_STDIT_CONFIG) if args.video else (build_toy_pixart, TOY_PIXART_CONFIG)
    name = "toy_stdit" if args.video else "toy_pixart"
    model = build()
    init = "random"
    if args.video and args.init_from != "none":
        path = TOY_PIXART_FILE if args.init_from == "auto" else pathlib.Path(args.init_from)
        pixart = load_toy_pixart(path)
        if pixart is None and args.init_from != "auto":
            raise SystemExit(f"--init-from {path}: no such file")
        if pixart is not None:
            fresh = stdit_init_from_pixart(model, pixart.state_dict())
            init = f"{path.name} (spatial weights; temporal attention proj zeroed, {len(fresh)} fresh tensors)"
    print(f"{name}: init {init}", flush=True)
    model = model.to(dev).train()
    ema = build().to(dev).eval()
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    a_bar = torch.cumprod(1 - betas, 0).float().to(dev)
    log, t0 = [], time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 300)
        if args.lr_decay == "cosine":
            progress = min(1.0, max(step / args.steps, (time.time() - t0) / args.max_seconds))
            lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(scenes), (args.batch,), device=dev)
        var = torch.randint(0, bank.shape[1], (args.batch,), device=dev)
        x0 = bank[idx, var]
        ctx = feats[idx]
        drop = torch.rand(args.batch, device=dev) < 0.1
        ctx = torch.where(drop[:, None, None], null.expand_as(ctx), ctx)
        t = torch.randint(0, 1000, (args.batch,), device=dev)
        noise = torch.randn_like(x0)
        ab = a_bar[t].view(-1, *[1] * (x0.ndim - 1))
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            pred = model(xt, t.float(), ctx)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        last = step == args.steps - 1 or time.time() - t0 > args.max_seconds
        if step % 500 == 0 or last:
            log.append({"step": step, "loss": loss.item(), "lr": lr, "seconds": time.time() - t0})
            print(json.dumps(log[-1]), flush=True)
        if last:
            break

    # score the EMA model with the analyzers (every image caption; --eval-captions video captions)
    ema.float()
    eval_scenes = scenes if not args.video else spread(scenes, args.eval_captions)
    eval_feats = caption_features(eval_scenes).to(dev)
    shape = (len(eval_scenes), 3, VIDEO_FRAMES, IMAGE_SIZE, IMAGE_SIZE) if args.video else \
        (len(eval_scenes), 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        noise = torch.randn(*shape, generator=torch.Generator(device="cpu").manual_seed(1)).to(dev)
        out = sample_euler_cfg(ema, noise, eval_feats, null, 20, 4.5).clamp(-1, 1).cpu()
    if args.video:
        videos = out.transpose(1, 2)  # [B, F, 3, H, W]
        align = sum(video_alignment(v, s) for v, s in zip(videos, eval_scenes)) / len(eval_scenes)
        smooth = sum(temporal_smoothness(v) for v in videos) / len(videos)
        rows, cols = min(6, len(videos)), VIDEO_FRAMES
        shown = videos[:rows].reshape(rows * VIDEO_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE)
    else:
        align = sum(alignment(im, s) for im, s in zip(out, eval_scenes)) / len(eval_scenes)
        smooth = None
        shown, rows, cols = out[:45], 5, 9
    sd = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in ema.state_dict().items()}
    meta = {"config": json.dumps(config), "steps": str(log[-1]["step"] + 1), "seed": str(args.seed),
            "alignment_20steps": f"{align:.2f}"}
    if args.video:
        meta.update(init=init, eval_captions=str(len(eval_scenes)), batch=str(args.batch), lr=str(args.lr),
                    lr_decay=args.lr_decay, train_seconds=f"{log[-1]['seconds']:.0f}")
    if smooth is not None:
        meta["temporal_smoothness_20steps"] = f"{smooth:.2f}"
    save_file(sd, str(args.out / f"{name}.safetensors"), metadata=meta)
    from PIL import Image

    grid = ((shown.reshape(rows, cols, 3, IMAGE_SIZE, IMAGE_SIZE).permute(0, 3, 1, 4, 2)
             .reshape(rows * IMAGE_SIZE, cols * IMAGE_SIZE, 3) + 1) / 2 * 255).round().byte().numpy()
    Image.fromarray(grid).resize((cols * 96, rows * 96), Image.NEAREST).save(args.out / f"{name}_samples.png")
    (args.out / f"{name}_train_log.json").write_text(json.dumps({
        "log": log, "alignment": align, "temporal_smoothness": smooth, "init": init,
        "eval_captions": len(eval_scenes),
        "args": {k: str(v) for k, v in vars(args).items()}}))
    print(f"{name}: alignment {align:.1f}%" + ("" if smooth is None else f", smoothness {smooth:.1f}") +
          f" over {len(eval_scenes)} captions ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
