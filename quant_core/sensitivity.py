"""Metric-decoupled quality measures for the mixed-precision planner (pure torch).

Each layer group is judged by what it damages (ViDiT-Q's metric decoupling, with proxies that need no extra
downloads):
  * visual   (self_attn, mlp):  the final latent vs FP16 (PSNR / relative error); with a decoder (a VAE in
                                ComfyUI) the decoded images (SSIM, PSNR)
  * text     (cross_attn):      the guidance direction eps_cond - eps_uncond of every step vs FP16 (cosine,
                                relative error): what CFG pushes toward the prompt
  * temporal (temporal_attn):   frame-to-frame differences of a video latent [B, C, T, H, W] vs FP16
Every metric also has a "damage" (>= 0, 0 = identical to FP16, roughly additive over independent errors):
the squared relative error, or 1 - SSIM for images. Sensitivities and budgets are computed on damages.

External scorers replace a proxy's damage with one measured by models outside the DiT (PlannerSettings.scorers):
ClipScoreScorer (text alignment: CLIP score of the decoded pictures against the prompt, vs FP16's) and
ImageScorer (visual fidelity: SSIM / PSNR of the decoded pictures, or their CLIP image-embedding drift). They
take the models as plain callables (decode, encode_image, a text embedding), so this module stays pure torch.

A TraceSession sits between a sampler and its model for one sampling run: it sets the timestep range clock
before each call, records each call's output per CFG branch, and (for planner trials) returns the FP16
reference's cached output for the calls that precede the first quantized timestep range (their inputs are
identical to the reference's, so they need no compute).
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .calibration import COND, UNCOND, bucket_of
from .metrics import PSNR_IDENTICAL, psnr_db
from .temporal import temporal_metrics as video_temporal_metrics

METRICS = ("visual", "text", "temporal")
METRIC_OF_GROUP = {"self_attn": "visual", "mlp": "visual", "cross_attn": "text", "temporal_attn": "temporal"}
METRIC_TITLES = {"visual": "visual fidelity", "text": "text alignment", "temporal": "temporal consistency"}


# -- traces ---------------------------------------------------------------------------------------------------
@dataclass
class StepRecord:
    """One model evaluation timestep: the outputs of the conditional and unconditional rows (None if absent)."""

    timestep: float
    bucket: int
    cond: Optional[torch.Tensor] = None
    uncond: Optional[torch.Tensor] = None

    def guidance(self) -> torch.Tensor:
        """cond - uncond (the CFG direction); the output of the one branch present when CFG is off."""
        if self.cond is not None and self.uncond is not None:
            c, u = self.cond, self.uncond
            if c.shape != u.shape:  # several cond chunks (areas): compare the branch means
                c, u = c.mean(0, keepdim=True), u.mean(0, keepdim=True)
            return c.float() - u.float()
        return (self.cond if self.cond is not None else self.uncond).float()


@dataclass
class Trace:
    final: torch.Tensor  # the sampled latent
    steps: List[StepRecord]
    call_timesteps: List[float]
    call_buckets: List[int]
    outputs: List[torch.Tensor] = field(default_factory=list)  # raw per-call outputs (reference runs only)
    images: Optional[torch.Tensor] = None  # decoded final latent, IMAGE layout [B, H, W, 3] in 0..1
    computed_calls: int = 0
    skipped_calls: int = 0
    # per-run work of external scorers (decoded pictures, embeddings), so each is done once per run
    memo: Dict[Any, Any] = field(default_factory=dict, repr=False)

    def steps_per_range(self, num_ranges: int) -> List[int]:
        counts = [0] * num_ranges
        for s in self.steps:
            counts[s.bucket] += 1
        return counts


class TraceSession:
    """Wraps every model call of one sampling run: `set_step(timesteps, branches)` before, `call(compute)` for it.

    clock: a RangeClock to set (the switchable layers read it); reference + active_ranges: skip the calls before
    the first call in an active range by returning the reference's output for that call.
    """

    def __init__(self, num_ranges: int, num_timesteps: float = 1000.0, clock=None, reference: Optional[Trace] = None,
                 active_ranges: Sequence[int] = (), keep_outputs: bool = False):
        self.num_ranges = num_ranges
        self.num_timesteps = num_timesteps
        self.clock = clock
        self.reference = reference
        self.active = set(active_ranges)
        self.keep_outputs = keep_outputs
        self.diverged = False
        self._t: Optional[float] = None
        self._bucket = 0
        self._branches: Optional[List[int]] = None
        self.steps: List[StepRecord] = []
        self.call_timesteps: List[float] = []
        self.call_buckets: List[int] = []
        self.outputs: List[torch.Tensor] = []
        self.computed = self.skipped = 0

    def set_step(self, timesteps: torch.Tensor, branches: Optional[Sequence[int]] = None) -> None:
        t = torch.as_tensor(timesteps).reshape(-1).detach().float().cpu()
        self._t = float(t[0])
        self._bucket = int(bucket_of(t[:1], self.num_ranges, self.num_timesteps)[0])
        self._branches = None if branches is None else list(branches)
        if self.clock is not None:
            self.clock.current = self._bucket

    def call(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self._t is None:
            raise RuntimeError("TraceSession.set_step() must be called before each model call")
        i = len(self.call_timesteps)
        ref = self.reference
        try:
            if (not self.diverged and self._bucket not in self.active and ref is not None and i < len(ref.outputs)
                    and abs(ref.call_timesteps[i] - self._t) <= 1e-4 * max(1.0, abs(self._t))):
                out = ref.outputs[i].clone()
                self.skipped += 1
            else:
                if self._bucket in self.active:
                    self.diverged = True
                out = compute()
                self.computed += 1
        finally:
            if self.clock is not None:
                self.clock.clear()
        self._record(out)
        return out

    def _record(self, out: torch.Tensor) -> None:
        self.call_timesteps.append(self._t)
        self.call_buckets.append(self._bucket)
        if self.keep_outputs:
            self.outputs.append(out.detach().clone())
        branches = self._branches if self._branches is not None and len(self._branches) == out.shape[0] \
            else [COND] * out.shape[0]
        parts = {}
        for tag in (COND, UNCOND):
            idx = [j for j, b in enumerate(branches) if b == tag]
            if idx:
                parts[tag] = out.detach()[idx]
        last = self.steps[-1] if self.steps else None
        same_t = last is not None and abs(last.timestep - self._t) <= 1e-6 * max(1.0, abs(self._t))
        if same_t and all(getattr(last, "cond" if tag == COND else "uncond") is None for tag in parts):
            step = last  # the other branch of a step whose branches ran as separate calls
        else:
            step = StepRecord(self._t, self._bucket)
            self.steps.append(step)
        step.cond = parts.get(COND, step.cond)
        step.uncond = parts.get(UNCOND, step.uncond)
        self._t = None

    def finish(self, final: torch.Tensor, images: Optional[torch.Tensor] = None) -> Trace:
        return Trace(final=final.detach(), steps=self.steps, call_timesteps=self.call_timesteps,
                     call_buckets=self.call_buckets, outputs=self.outputs, images=images,
                     computed_calls=self.computed, skipped_calls=self.skipped)


# -- metrics --------------------------------------------------------------------------------------------------
def _rel(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    return (torch.linalg.vector_norm(ref - test) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()


def _cos(ref: torch.Tensor, test: torch.Tensor) -> float:
    return F.cosine_similarity(ref.double().reshape(1, -1), test.double().reshape(1, -1)).item()


def ssim(ref: torch.Tensor, test: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of images [B, H, W, C] in 0..1 (Gaussian window, the usual constants)."""
    a = ref.double().movedim(-1, 1)
    b = test.double().movedim(-1, 1)
    window = max(1, min(window, a.shape[-1], a.shape[-2]) // 2 * 2 + 1)
    if window > min(a.shape[-1], a.shape[-2]):
        window -= 2
    window = max(1, window)
    x = torch.arange(window, dtype=torch.float64, device=a.device) - window // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    c = a.shape[1]
    k = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(v):
        return F.conv2d(v, k, groups=c)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a ** 2
    sbb = blur(b * b) - mu_b ** 2
    sab = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return s.mean().item()


def visual_metrics(ref: Trace, test: Trace) -> Dict[str, float]:
    out = {"latent_psnr_db": psnr_db(ref.final, test.final), "latent_rel_err": _rel(ref.final, test.final)}
    if ref.images is not None and test.images is not None:
        out["image_psnr_db"] = psnr_db(ref.images, test.images)
        out["image_ssim"] = ssim(ref.images, test.images)
    return out


def text_metrics(ref: Trace, test: Trace) -> Dict[str, float]:
    pairs = list(zip(ref.steps, test.steps))
    if not pairs:
        return {}
    cos = [_cos(a.guidance(), b.guidance()) for a, b in pairs]
    rel = [_rel(a.guidance(), b.guidance()) for a, b in pairs]
    return {"guidance_cosine": sum(cos) / len(cos), "guidance_rel_err": sum(rel) / len(rel),
            "guidance_rel_err_sq": sum(r * r for r in rel) / len(rel)}


def temporal_metrics(ref: Trace, test: Trace) -> Dict[str, float]:
    """Frame-difference error of the final video latents (quant_core/temporal.py's definition); {} for images."""
    if ref.final.ndim != 5 or ref.final.shape[2] < 2:
        return {}
    m = video_temporal_metrics(ref.final, test.final)
    return {"frame_diff_rel_err": m["frame_diff_rel_l2"], "frame_diff_psnr_db": m["frame_diff_psnr_db"]}


def all_metrics(ref: Trace, test: Trace) -> Dict[str, Dict[str, float]]:
    """Every applicable metric of a run vs the FP16 reference, by metric family."""
    out = {"visual": visual_metrics(ref, test), "text": text_metrics(ref, test)}
    temporal = temporal_metrics(ref, test)
    if temporal:
        out["temporal"] = temporal
    return out


def damages(ref: Trace, test: Trace) -> Dict[str, float]:
    """Damage (>= 0, 0 = as FP16) per metric family: what the planner ranks layers by."""
    m = all_metrics(ref, test)
    vis = m["visual"]
    out = {"visual": max(0.0, 1.0 - vis["image_ssim"]) if "image_ssim" in vis else vis["latent_rel_err"] ** 2,
           "text": m["text"].get("guidance_rel_err_sq", 0.0)}
    if "temporal" in m:
        out["temporal"] = m["temporal"]["frame_diff_rel_err"] ** 2
    return out


def headline(metrics: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """The flat numbers a report shows (higher-is-better ones first)."""
    flat = {}
    for fam in ("visual", "text", "temporal"):
        for k, v in metrics.get(fam, {}).items():
            if not k.endswith("_sq"):
                flat[k] = min(v, PSNR_IDENTICAL) if k.endswith("_db") else v
    return flat


# -- external scorers -----------------------------------------------------------------------------------------
BUILT_IN_DAMAGE = {
    "visual": "built-in proxy: final latent vs FP16, squared relative error (1 - SSIM of the pictures when the "
              "planner has a VAE)",
    "text": "built-in proxy: CFG guidance direction eps_cond - eps_uncond vs FP16, mean squared relative error",
    "temporal": "built-in proxy: frame-to-frame differences of the video latent vs FP16, squared relative error",
}


def scorer_label(scorer) -> str:
    """What a report calls an external scorer: its `label`, else its function or class name."""
    return str(getattr(scorer, "label", None) or getattr(scorer, "__name__", None) or type(scorer).__name__)


def scorer_metrics(scorer, ref: "Trace", test: "Trace") -> Dict[str, float]:
    """The report numbers of an external scorer (its optional `metrics(ref, test)`), {} for a bare callable."""
    fn = getattr(scorer, "metrics", None)
    return {k: float(v) for k, v in fn(ref, test).items()} if callable(fn) else {}


class ExternalScorer:
    """damage(reference Trace, test Trace) >= 0 measured on the decoded final latent by models outside the DiT.

    decode: latent -> pictures [N, H, W, 3] in 0..1 (video frames flattened into N). Decoding and embedding are
    memoised on the Trace: the FP16 reference is decoded once per sweep, and a run scored for the damage and
    then for the report is decoded once. `metric` is the family it replaces by default; `label` names it in
    reports and on the heat map.
    """

    metric = "visual"

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], label: Optional[str] = None):
        self._decode = decode
        self._token = object()  # memo key: unique while any memo holds it
        self.label = label or type(self).__name__

    def _memo(self, trace: "Trace", what: str, compute: Callable[[], Any]) -> Any:
        key = (self._token, what)
        if key not in trace.memo:
            trace.memo[key] = compute()
        return trace.memo[key]

    def images(self, trace: "Trace") -> torch.Tensor:
        def decode():
            img = self._decode(trace.final)
            if not torch.is_tensor(img) or img.ndim != 4 or img.shape[-1] != 3:
                shape = tuple(img.shape) if torch.is_tensor(img) else type(img).__name__
                raise ValueError(f"{self.label}: decode must give pictures [N, H, W, 3], got {shape}")
            return img.detach().float().cpu()
        return self._memo(trace, "images", decode)

    def evaluate(self, ref: "Trace", test: "Trace") -> Tuple[float, Dict[str, float]]:
        raise NotImplementedError

    def __call__(self, ref: "Trace", test: "Trace") -> float:
        return self.evaluate(ref, test)[0]

    def metrics(self, ref: "Trace", test: "Trace") -> Dict[str, float]:
        return self.evaluate(ref, test)[1]

    def _paired(self, ref: torch.Tensor, test: torch.Tensor, what: str) -> None:
        if ref.shape != test.shape:
            raise ValueError(f"{self.label}: the {what} of the FP16 run {tuple(ref.shape)} and of the test run "
                             f"{tuple(test.shape)} differ (the runs must sample the same latent)")


class _EmbeddingScorer(ExternalScorer):
    """Adds unit-length embeddings [N, D] of the decoded pictures (e.g. CLIP vision image_embeds)."""

    def __init__(self, decode, encode_image: Callable[[torch.Tensor], torch.Tensor], label=None):
        super().__init__(decode, label)
        self._encode = encode_image

    def embeds(self, trace: "Trace") -> torch.Tensor:
        def encode():
            img = self.images(trace)
            e = self._encode(img)
            if not torch.is_tensor(e) or e.ndim != 2 or e.shape[0] != img.shape[0]:
                shape = tuple(e.shape) if torch.is_tensor(e) else type(e).__name__
                raise ValueError(f"{self.label}: encode_image must give one embedding per picture "
                                 f"[{img.shape[0]}, D], got {shape}")
            e = e.detach().double().cpu()
            if not torch.isfinite(e).all():
                raise ValueError(f"{self.label}: the image encoder gave non-finite embeddings")
            return F.normalize(e, dim=-1)
        return self._memo(trace, "embeds", encode)


CLIP_DAMAGES = ("score_change", "score_drop")


class ClipScoreScorer(_EmbeddingScorer):
    """Text alignment: CLIP score = 100 cos(image embedding, text embedding) of every decoded picture (every
    frame of a video: CLIPSIM), the quantized run's vs the FP16 run's.

    damage "score_change" (default): mean over pictures of (cos_test - cos_fp16)^2. Squared like the built-in
    damages (never negative, additive over independent errors in expectation); a rise counts too, because the
    planner aims at FP16's picture and, for one prompt and seed, a rise or a fall of the same size is equally
    likely to be noise. "score_drop": max(0, mean cos_fp16 - mean cos_test): only a loss counts (what CLIPScore
    evaluations report); with few samples many units score 0 by chance, and if the uniform low-bit model does
    not lower the score the metric has no normaliser.
    """

    metric = "text"

    def __init__(self, decode, encode_image, text_embeds: torch.Tensor, damage: str = "score_change", label=None):
        super().__init__(decode, encode_image, label)
        if damage not in CLIP_DAMAGES:
            raise ValueError(f"damage must be one of {CLIP_DAMAGES}, got {damage!r}")
        t = torch.as_tensor(text_embeds).detach().double().cpu().reshape(-1)
        if not torch.isfinite(t).all() or float(t.norm()) == 0.0:
            raise ValueError(f"{self.label}: the text embedding is zero or not finite")
        self.text = F.normalize(t, dim=0)
        self.damage = damage

    def cosines(self, trace: "Trace") -> torch.Tensor:
        e = self.embeds(trace)
        if e.shape[1] != self.text.shape[0]:
            raise ValueError(f"{self.label}: image embeddings are {e.shape[1]}-d, the text embedding is "
                             f"{self.text.shape[0]}-d: the two encoders are not a CLIP pair")
        return e @ self.text

    def evaluate(self, ref, test):
        a, b = self.cosines(ref), self.cosines(test)
        self._paired(a, b, "CLIP scores")
        if self.damage == "score_change":
            damage = float(((b - a) ** 2).mean())
        else:
            damage = max(0.0, float(a.mean() - b.mean()))
        return damage, {"clip_score": 100 * float(b.mean()), "clip_score_fp16": 100 * float(a.mean()),
                        "clip_score_change": 100 * float(b.mean() - a.mean())}


IMAGE_DAMAGES = ("ssim", "psnr", "clip_image")


class ImageScorer(_EmbeddingScorer):
    """Visual fidelity on the decoded pictures, the quantized run's vs the FP16 run's.

    kind "ssim": damage 1 - SSIM. "psnr": damage = mean squared error of the pictures (0..1; PSNR = -10 log10 of
    it), additive over independent errors. "clip_image": damage = mean 1 - cos of the CLIP image embeddings
    (how far each picture moved in CLIP's space, about half the squared angle); needs encode_image.
    """

    metric = "visual"

    def __init__(self, decode, kind: str = "ssim", encode_image=None, label=None):
        super().__init__(decode, encode_image, label)
        if kind not in IMAGE_DAMAGES:
            raise ValueError(f"kind must be one of {IMAGE_DAMAGES}, got {kind!r}")
        if kind == "clip_image" and encode_image is None:
            raise ValueError(f"{self.label}: kind 'clip_image' needs an image encoder")
        self.kind = kind

    def evaluate(self, ref, test):
        if self.kind == "clip_image":
            a, b = self.embeds(ref), self.embeds(test)
            self._paired(a, b, "image embeddings")
            cos = (a * b).sum(-1)
            return float((1 - cos).clamp_min(0).mean()), {"clip_image_cosine": float(cos.mean())}
        a, b = self.images(ref), self.images(test)
        self._paired(a, b, "pictures")
        mse = float(torch.mean((a.double() - b.double()) ** 2))
        psnr = PSNR_IDENTICAL if mse == 0 else min(PSNR_IDENTICAL, -10.0 * float(np.log10(mse)))
        if self.kind == "psnr":
            return mse, {"scored_image_psnr_db": psnr}
        s = ssim(a, b)
        return max(0.0, 1.0 - s), {"scored_image_ssim": s, "scored_image_psnr_db": psnr}


# -- heat map -------------------------------------------------------------------------------------------------
DECADES = 4.0  # the heat map's colour scale spans this many powers of ten below each metric's largest damage
_GROUP_COLORS = {"self_attn": (80, 160, 255), "cross_attn": (255, 170, 60), "mlp": (120, 220, 120),
                 "temporal_attn": (220, 120, 255)}
_BITS_COLORS = {4: (40, 70, 150), 6: (60, 140, 160), 8: (230, 120, 40), 16: (220, 220, 220)}


def _heat(v: float) -> tuple:
    """0..1 -> black -> red -> yellow -> white (the palette of the compare images)."""
    v = min(1.0, max(0.0, v))
    return (int(255 * min(1, v * 3)), int(255 * min(1, max(0, v * 3 - 1))), int(255 * min(1, max(0, v * 3 - 2))))


def render_heatmap(unit_names: List[str], unit_groups: List[str], metrics: List[str], damage: torch.Tensor,
                   own_metric: List[str], bits: torch.Tensor, range_labels: List[str], title: List[str],
                   cell=(22, 14), label_w: int = 200, metric_labels: Optional[List[str]] = None) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: rows = layers (or blocks); per metric one column per timestep range (noisiest left),
    colour = log damage relative to the uniform low-bit model (own metric full colour, other metrics dimmed);
    then the chosen weight bits per range (or one column for a per-layer plan). metric_labels: the column
    headers (default: the metric names)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    n_units, n_metrics, n_ranges = damage.shape
    cw, ch = cell
    bits_cols = bits.shape[1]
    header = 14 * len(title) + 34
    gap = 8
    width = label_w + n_metrics * (n_ranges * cw + gap) + bits_cols * cw + gap + 8
    width = max(width, 12 + max((int(font.getlength(line)) for line in title), default=0))
    height = header + n_units * ch + 8
    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(title):
        draw.text((6, 4 + 14 * i), line, fill=(235, 235, 235), font=font)
    y0 = header
    order = list(range(n_ranges))[::-1]  # noisiest range first, as sampling runs
    for m in range(n_metrics):
        vals = damage[:, m].double()
        pos = vals[vals > 0]
        hi = float(pos.max().log10()) if len(pos) else 1.0
        lo = max(float(pos.min().log10()), hi - DECADES) if len(pos) else 0.0
        span = max(hi - lo, 1e-6)
        x0 = label_w + m * (n_ranges * cw + gap)
        col_title = (metric_labels or metrics)[m]
        draw.text((x0, y0 - 30), col_title[:(n_ranges * cw + gap) // 6], fill=(235, 235, 235), font=font)
        for j, r in enumerate(order):
            draw.text((x0 + j * cw + 2, y0 - 16), range_labels[r], fill=(170, 170, 170), font=font)
        for u in range(n_units):
            for j, r in enumerate(order):
                v = float(vals[u, r])
                level = 0.0 if v <= 0 else 0.08 + 0.92 * max(0.0, float(np.log10(v)) - lo) / span
                rgb = _heat(level)
                if own_metric[u] != metrics[m]:
                    rgb = tuple(int(c * 0.35 + 20) for c in rgb)
                x, y = x0 + j * cw, y0 + u * ch
                draw.rectangle([x, y, x + cw - 2, y + ch - 2], fill=rgb)
    xb = label_w + n_metrics * (n_ranges * cw + gap)
    draw.text((xb, y0 - 30), "bits", fill=(235, 235, 235), font=font)
    border = order if bits_cols == n_ranges else list(range(bits_cols))
    for j, r in enumerate(border):
        if bits_cols > 1:
            draw.text((xb + j * cw + 2, y0 - 16), range_labels[r], fill=(170, 170, 170), font=font)
        for u in range(n_units):
            b = int(bits[u, r])
            x, y = xb + j * cw, y0 + u * ch
            draw.rectangle([x, y, x + cw - 2, y + ch - 2], fill=_BITS_COLORS.get(b, (128, 128, 128)))
            draw.text((x + 5, y + 1), str(b), fill=(255, 255, 255), font=font)
    for u, (name, group) in enumerate(zip(unit_names, unit_groups)):
        y = y0 + u * ch
        draw.rectangle([4, y + 2, 10, y + ch - 4], fill=_GROUP_COLORS.get(group, (160, 160, 160)))
        label = name if len(name) <= (label_w - 20) // 6 else "..." + name[-((label_w - 20) // 6 - 3):]
        draw.text((14, y + 1), label, fill=(225, 225, 225), font=font)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return arr[None].contiguous()
