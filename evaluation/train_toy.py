#!/usr/bin/env python3
"""Train the toy PixArt-architecture text-to-image model on the procedural shape world (GPU, minutes).

    python -m viditq.evaluation.train_toy --out DIR [--steps 6000] [--seed 0]
(or through bench/run_train_toy.py, which imports the repo as `viditq`). eps-prediction on PixArt's discrete
linear-beta schedule, 10% caption dropout for CFG, AdamW + EMA; writes toy_pixart.safetensors (fp16 EMA
weights + config metadata), samples.png and train_log.json.
"""
import argparse
import json
import pathlib
import random
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..standalone.sampler import sample_euler_cfg
from .analyzers import alignment
from .toy_models import IMAGE_SIZE, TOY_PIXART_CONFIG, build_toy_pixart, caption_features, null_features
from .toy_world import all_image_scenes, render


def jittered_bank(scenes, variants: int, device) -> torch.Tensor:
    """[len(scenes), variants, 3, S, S]: each scene shifted by up to 2 px (so positions are regions)."""
    out = torch.empty(len(scenes), variants, 3, IMAGE_SIZE, IMAGE_SIZE)
    rng = random.Random(0)
    for i, s in enumerate(scenes):
        base = render(s, IMAGE_SIZE)
        for v in range(variants):
            dx, dy = rng.randint(-2, 2), rng.randint(-2, 2)
            shifted = torch.roll(base, shifts=(dy, dx), dims=(1, 2))
            out[i, v] = shifted
    return out.to(device)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    scenes = all_image_scenes()
    bank = jittered_bank(scenes, 16, dev)
    feats = caption_features(scenes).to(dev)
    null = null_features(1).to(dev)
    model = build_toy_pixart().to(dev).train()
    ema = build_toy_pixart().to(dev).eval()
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    a_bar = torch.cumprod(1 - betas, 0).float().to(dev)
    log, t0 = [], time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 300)
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
        ab = a_bar[t].view(-1, 1, 1, 1)
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
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        if step % 500 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": loss.item(), "seconds": time.time() - t0})
            print(json.dumps(log[-1]), flush=True)

    # score the EMA model on every caption with the analyzers
    ema.float()
    with torch.no_grad():
        g = torch.Generator(device="cpu").manual_seed(1)
        noise = torch.randn(len(scenes), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(dev)
        imgs = sample_euler_cfg(ema, noise, feats, null, 20, 4.5)
    imgs = imgs.clamp(-1, 1).cpu()
    align = sum(alignment(im, s) for im, s in zip(imgs, scenes)) / len(scenes)
    sd = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in ema.state_dict().items()}
    save_file(sd, str(args.out / "toy_pixart.safetensors"),
              metadata={"config": json.dumps(TOY_PIXART_CONFIG), "steps": str(args.steps), "seed": str(args.seed),
                        "alignment_fp32_20steps": f"{align:.2f}"})
    from PIL import Image

    grid = ((imgs[:45].reshape(5, 9, 3, IMAGE_SIZE, IMAGE_SIZE).permute(0, 3, 1, 4, 2)
             .reshape(5 * IMAGE_SIZE, 9 * IMAGE_SIZE, 3) + 1) / 2 * 255).round().byte().numpy()
    Image.fromarray(grid).resize((9 * 96, 5 * 96), Image.NEAREST).save(args.out / "samples.png")
    (args.out / "train_log.json").write_text(json.dumps({"log": log, "alignment": align,
                                                          "args": {k: str(v) for k, v in vars(args).items()}}))
    print(f"alignment of EMA samples over {len(scenes)} captions: {align:.1f}%  ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
