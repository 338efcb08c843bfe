"""Custom ComfyUI socket types of this plugin (public interface: keep the names stable)."""
from comfy_api.latest import io

CalibType = io.Custom("VIDITQ_CALIB")
PlanType = io.Custom("VIDITQ_PLAN")
