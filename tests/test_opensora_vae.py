"""OpenSORA 1.2 video VAE, temporal half (models/opensora/vae12.py): official key layout, chunking, causality."""
import torch

from viditq.models.opensora.scheduler import latent_frames
from viditq.models.opensora.tiny import build_tiny_temporal_vae_state_dict
from viditq.models.opensora.vae12 import TemporalVAE, chunk_frames, decode_latents, temporal_config_from_state_dict

# official names (hpcai-tech/Open-Sora v1.2.0 opensora/models/vae/vae_temporal.py, VAE_Temporal_SD)
OFFICIAL = ["encoder.conv_in.conv.weight", "encoder.block_res_blocks.0.0.norm1.weight",
            "encoder.block_res_blocks.1.0.conv3.conv.weight", "encoder.conv_blocks.1.conv.weight",
            "encoder.conv_blocks.2.conv.bias", "encoder.res_blocks.0.conv2.conv.weight", "encoder.norm1.bias",
            "encoder.conv2.conv.weight", "quant_conv.conv.weight", "post_quant_conv.conv.bias",
            "decoder.conv1.conv.weight", "decoder.res_blocks.0.norm2.weight",
            "decoder.block_res_blocks.3.0.conv1.conv.weight",
            "decoder.block_res_blocks.0.0.conv3.conv.weight", "decoder.conv_blocks.1.conv.weight",
            "decoder.conv_blocks.2.conv.weight", "decoder.norm1.weight", "decoder.conv_out.conv.bias"]


def tiny_vae(seed=0):
    sd = build_tiny_temporal_vae_state_dict(seed)
    inner = {k[len("temporal_vae."):]: v for k, v in sd.items() if k.startswith("temporal_vae.")}
    cfg = temporal_config_from_state_dict(inner)
    vae = TemporalVAE(**cfg).eval()
    vae.load_state_dict(inner, strict=True)
    return vae, inner, cfg


def test_official_layout_and_config_from_keys():
    _, sd, cfg = tiny_vae()
    assert not [k for k in OFFICIAL if k not in sd]
    assert "decoder.conv_blocks.0.conv.weight" not in sd  # no temporal upsampling at the first level (Identity)
    assert cfg == dict(channels=4, latent=4, filters=32, blocks=1, mults=(1, 2, 2, 4), time_down=(False, True, True),
                       groups=32, encoder=True)
    assert sd["decoder.conv_blocks.2.conv.weight"].shape[:2] == (2 * 128, 128)  # conv to 2x channels, depth to time


def test_chunking_matches_the_latent_size_rule():
    assert list(chunk_frames(5)) == [17] and list(chunk_frames(1)) == [1] and list(chunk_frames(7)) == [17, 5]
    for t in (1, 4, 5, 6, 10, 12):
        assert sum(latent_frames(n, "1.2") for n in chunk_frames(t)) == t


def test_decode_encode_shapes_and_causality():
    vae, _, _ = tiny_vae()
    z = torch.randn(1, 4, 7, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = decode_latents(vae, z)
        assert x.shape == (1, 4, 17 + 5, 6, 6) and torch.isfinite(x).all()
        # 17-frame chunks are decoded independently (GroupNorm statistics span a chunk, so within one chunk the
        # convolutions are causal but the normalisation is not)
        z2 = z.clone()
        z2[:, :, 4] += 1.0
        x2 = decode_latents(vae, z2)
        assert not torch.equal(x2[:, :, 13:17], x[:, :, 13:17]) and torch.equal(x2[:, :, 17:], x[:, :, 17:])
        e = vae.encode(torch.randn(1, 4, 17, 6, 6))
        assert e.shape == (1, 4, 5, 6, 6)
        assert vae.encode(torch.randn(1, 4, 16, 6, 6)).shape == (1, 4, 4, 6, 6)
