"""The one import of ComfyUI's node API. A versioned module (not `latest`, which changes without
warning): moving to a newer API is an edit of this file."""
from comfy_api.v0_0_2 import ComfyExtension, io  # noqa: F401

DICTIONARY = io.Custom("SAFEDIG_DICTIONARY")
CATEGORY = "SafeDIG"
