"""The ComfyExtension listing this plugin's nodes (imported lazily by the package's comfy_entrypoint)."""
from comfy_api.latest import ComfyExtension, io

from .calibrate import ViDiTQCalibrate
from .planner import ViDiTQLoadPlan, ViDiTQPlanner
from .compile_model import ViDiTQCompileModel
from .cuda_graphs import ViDiTQCudaGraphs
from .checkpoint_nodes import ViDiTQLoadQuantized, ViDiTQSaveQuantized
from .quantize import ViDiTQQuantize
from .opensora_nodes import (EmptyOpenSoraLatent, OpenSoraFlowShift, OpenSoraNullConditioning, OpenSoraVAEDecode,
                             ViDiTQOpenSoraLoader, ViDiTQOpenSoraVAELoader, ViDiTQSaveVideo)
from .sampler import ViDiTQQuantizedSampler
from .scorers import ViDiTQClipScorer, ViDiTQImageScorer
from .text_encoder_int8 import ViDiTQTextEncoderInt8


class ViDiTQExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ViDiTQCalibrate, ViDiTQQuantize, ViDiTQQuantizedSampler,
                ViDiTQSaveQuantized, ViDiTQLoadQuantized, ViDiTQTextEncoderInt8,
                ViDiTQOpenSoraLoader, ViDiTQOpenSoraVAELoader, EmptyOpenSoraLatent, OpenSoraVAEDecode,
                OpenSoraNullConditioning, OpenSoraFlowShift, ViDiTQSaveVideo, ViDiTQPlanner, ViDiTQLoadPlan,
                ViDiTQClipScorer, ViDiTQImageScorer, ViDiTQCompileModel, ViDiTQCudaGraphs]
