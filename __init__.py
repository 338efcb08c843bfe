"""ComfyUI-ViDiT-Q: ViDiT-Q quantization (W8A8 / W4A8) of diffusion transformers as ComfyUI nodes.

ComfyUI imports this package from custom_nodes/; nothing heavy or ComfyUI-specific is imported here,
so the package also imports cleanly from plain scripts and tests.
"""
__version__ = "0.1.0"


async def comfy_entrypoint():
    """ComfyUI V3 entry point: returns the extension that lists our nodes."""
    from .nodes.extension import ViDiTQExtension

    return ViDiTQExtension()
