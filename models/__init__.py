"""Plain-torch model code in the official key layouts (used where ComfyUI is absent, and for tests)."""
