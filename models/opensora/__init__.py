"""OpenSORA video DiTs in plain torch (ComfyUI model style, official key layouts): STDiT (1.0), STDiT3 (1.2),
checkpoint reading / version detection, the scheduler mapping onto ComfyUI's model sampling, tiny builders."""
from .checkpoint import (VARIANTS, VERSIONS, OpenSoraCheckpointError, build_model, config_from_state_dict,
                         detect_version, load_opensora, read_state_dict)
from .stdit import STDiT
from .stdit3 import STDiT3

__all__ = ["OpenSoraCheckpointError", "STDiT", "STDiT3", "VARIANTS", "VERSIONS", "build_model",
           "config_from_state_dict", "detect_version", "load_opensora", "read_state_dict"]
