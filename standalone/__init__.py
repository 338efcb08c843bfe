"""The whole pipeline without ComfyUI: a plain-torch sampler and the one-command demo."""
