"""SafeDIG, a ComfyUI node pack: safety steering of FLUX and SD3 through sparse autoencoder dictionaries.

ComfyUI loads this folder from `custom_nodes/` and calls `comfy_entrypoint` (the V3 node API). Only the
V3 entrypoint is exported: ComfyUI reads legacy NODE_CLASS_MAPPINGS first and would ignore it.
"""
from .nodes import SafeDIGExtension, register_dictionary_folder, register_folder

register_folder()
register_dictionary_folder()  # the testbed's shipped dictionary


async def comfy_entrypoint() -> SafeDIGExtension:
    return SafeDIGExtension()
