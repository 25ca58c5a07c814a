"""The one import of ComfyUI's node API. A versioned module (not `latest`, which changes without warning):
the newest version this pack was checked against that the running ComfyUI has, so moving to a newer API is
an edit of `VERSIONS`. ComfyUI 0.3.75 ships `v0_0_2`; later releases add `v0_0_3` (the same `io` and
`ComfyExtension` names) and keep the older versions as adapters."""
import importlib

VERSIONS = ("comfy_api.v0_0_3", "comfy_api.v0_0_2")


def load(versions=VERSIONS):
    """(module name, module) of the first of `versions` that imports and has `io` and `ComfyExtension`."""
    for name in versions:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "io") and hasattr(module, "ComfyExtension"):
            return name, module
    raise ImportError(f"SafeDIG needs ComfyUI's node API ({' or '.join(versions)}): update ComfyUI to 0.3.75 or newer")


API_VERSION, _api = load()
ComfyExtension, io = _api.ComfyExtension, _api.io

DICTIONARY = io.Custom("SAFEDIG_DICTIONARY")
CATEGORY = "SafeDIG"
