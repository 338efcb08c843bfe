"""Weight-only int8 for the T5 text encoder: embedding error vs the FP encoder, real memory savings, the node."""
import json

import pytest
import torch
import torch.nn as nn

from comfy_env import COMFYUI_PATH, import_comfyui, requires_comfyui
from viditq.nodes.text_encoder_int8 import Int8WeightOnlyLinear, fp_bytes, quantize_linears_int8
from viditq.quant_core.metrics import compare

EMBED_REL_L2_BOUND = 0.05  # int8 per-channel weights: ~0.6 % per random layer, 2-2.5 % after 15 of them (fp32 / bf16);
                           # the same weights at 4 bits give ~30 %


class TinyT5Like(nn.Module):
    """Gated-GELU feed-forward + attention-like projections with RMS norms, like a T5 encoder block."""

    def __init__(self, d=64, ff=160, layers=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(100, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            b = nn.ModuleDict({"q": nn.Linear(d, d, bias=False), "o": nn.Linear(d, d, bias=False),
                               "wi_0": nn.Linear(d, ff, bias=False), "wi_1": nn.Linear(d, ff, bias=False),
                               "wo": nn.Linear(ff, d, bias=False)})
            self.blocks.append(b)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            x = x + b["o"](torch.tanh(b["q"](h)))
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            x = x + b["wo"](nn.functional.gelu(b["wi_0"](h), approximate="tanh") * b["wi_1"](h))
        return x


def _swap(model, layers):
    for name, q in layers.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_weight_only_embedding_error_and_bytes(dtype):
    fp = TinyT5Like().to(dtype)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = fp(ids)
    q = TinyT5Like().to(dtype)
    layers = quantize_linears_int8(q)
    assert len(layers) == 15 and all(type(q.get_submodule(n)) is nn.Linear for n in layers)  # q not modified
    _swap(q, layers)
    with torch.no_grad():
        out = q(ids)
    assert out.dtype == dtype
    err = compare(ref.float(), out.float())
    assert err["rel_l2"] < EMBED_REL_L2_BOUND and err["cosine"] > 0.999
    fp_total = sum(fp_bytes(m) for m in fp.modules() if isinstance(m, nn.Linear))
    q_total = sum(m.weight_bytes() for m in layers.values())
    n_out = sum(m.out_features for m in layers.values())
    assert q_total == fp_total // fp.blocks[0]["q"].weight.element_size() + 4 * n_out  # 1 byte/weight + scales
    # a broken quantizer (4-bit codes in the same container) would fail the bound
    coarse = TinyT5Like().to(dtype)
    bad = quantize_linears_int8(coarse)
    for m in bad.values():
        m.qweight.copy_((m.qweight.float() / 16).round().clamp(-7, 7).to(torch.int8))
        m.scale.mul_(16)
    _swap(coarse, bad)
    with torch.no_grad():
        assert compare(ref.float(), coarse(ids).float())["rel_l2"] > EMBED_REL_L2_BOUND


def test_int8_layer_matches_dequantized_reference_and_refuses_fp8():
    lin = nn.Linear(32, 24)
    q = Int8WeightOnlyLinear.from_linear(lin)
    x = torch.randn(5, 32)
    w = q.qweight.float() * q.scale[:, None]
    assert torch.allclose(q(x), x @ w.t() + lin.bias, atol=1e-5)
    assert (w - lin.weight).abs().max() <= q.scale.max() / 2 + 1e-6
    lin8 = nn.Linear(8, 8)
    lin8.weight.data = lin8.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="already smaller"):
        Int8WeightOnlyLinear.from_linear(lin8)
    with pytest.raises(ValueError, match="already int8"):
        quantize_linears_int8(nn.Sequential(q))


TINY_T5 = {"d_ff": 96, "d_kv": 8, "d_model": 64, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
           "layer_norm_epsilon": 1e-6, "model_type": "t5", "num_heads": 4, "num_layers": 2,
           "relative_attention_num_buckets": 32, "vocab_size": 32128}


def _tiny_t5_clip():
    """A ComfyUI CLIP holding comfy.text_encoders.t5 with a tiny config (the PixArt tokenizer), seeded weights."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.pixart_t5
    import comfy.text_encoders.t5

    class TinyT5(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, textmodel_json_config=dict(TINY_T5), dtype=dtype,
                             special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                             model_options=model_options)

    class TinyTE(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, name="t5xxl", clip_model=TinyT5, model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.pixart_t5.PixArtTokenizer, TinyTE)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in clip.cond_stage_model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(torch.ones(p.shape))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] if p.ndim else 1) ** 0.5)
    return clip


@requires_comfyui
def test_t5_int8_node_on_a_comfyui_t5():
    import_comfyui()
    from viditq.nodes.text_encoder_int8 import ViDiTQTextEncoderInt8

    clip = _tiny_t5_clip()
    tokens = clip.tokenize("a red fox in the snow")
    ref = clip.encode_from_tokens(tokens).clone()
    out = ViDiTQTextEncoderInt8.execute(clip, "a red fox in the snow")
    clip_q, text = out.args
    report = json.loads(text)
    assert report["layers"] == 2 * 7  # q, k, v, o, wi_0, wi_1, wo per block
    assert report["linear_weight_bytes_int8"] < 0.3 * report["linear_weight_bytes_fp"]  # fp32 here -> 1/4 + scales
    assert report["embedding_error"]["rel_l2"] < EMBED_REL_L2_BOUND
    got = clip_q.encode_from_tokens(tokens)
    assert compare(ref, got)["rel_l2"] < EMBED_REL_L2_BOUND and not torch.equal(ref, got)
    assert torch.equal(clip.encode_from_tokens(tokens), ref)  # the FP CLIP is left as it was
    assert clip_q.patcher.model_size() < clip.patcher.model_size()
    with pytest.raises(ValueError, match="already int8"):
        ViDiTQTextEncoderInt8.execute(clip_q, "")
    with pytest.raises(ValueError, match="needs a T5 text encoder"):
        import comfy.sd

        fake = comfy.sd.CLIP(no_init=True)
        fake.cond_stage_model = nn.Sequential(nn.Linear(2, 2))
        fake.patcher = clip.patcher
        ViDiTQTextEncoderInt8.execute(fake, "")


def test_module_imports_without_comfyui():
    import importlib
    import sys

    mod = importlib.import_module("viditq.nodes.text_encoder_int8")
    assert hasattr(mod, "Int8WeightOnlyLinear")
    if not COMFYUI_PATH:
        assert "comfy_api" not in sys.modules
