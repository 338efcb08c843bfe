"""The ComfyExtension listing this plugin's nodes (imported lazily by the package's comfy_entrypoint)."""
from comfy_api.latest import ComfyExtension, io

from .calibrate import ViDiTQCalibrate
from .quantize import ViDiTQQuantize
from .sampler import ViDiTQQuantizedSampler


class ViDiTQExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ViDiTQCalibrate, ViDiTQQuantize, ViDiTQQuantizedSampler]
