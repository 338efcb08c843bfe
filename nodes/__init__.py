"""ComfyUI nodes (the only code that imports ComfyUI); each node validates, calls quant_core, wraps outputs."""
