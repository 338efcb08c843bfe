"""A test-only ComfyUI custom node: stand-in T5 features for a prompt (no T5-XXL can be downloaded here).

The integration test links this folder into the temporary ComfyUI's custom_nodes and swaps the shared
workflow's CLIPLoader/CLIPTextEncode for it; everything else in the workflow runs as users run it.
"""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "viditq_tiny_pixart", pathlib.Path(__file__).resolve().parents[2] / "models" / "tiny_pixart.py")
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


class ViDiTQTestTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "_for_testing"

    def encode(self, text):
        return ([[_tiny.pseudo_caption(text), {}]],)


NODE_CLASS_MAPPINGS = {"ViDiTQTestTextEncode": ViDiTQTestTextEncode}
