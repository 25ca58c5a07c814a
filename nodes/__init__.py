"""SafeDIG's ComfyUI nodes: a thin layer over `safedig_core`."""
from .api import ComfyExtension, io
from .apply_steering import SafeDIGApplySteering
from .build_dictionary import SafeDIGBuildDictionary
from .collect_activations import SafeDIGCollectActivations
from .feature_map import SafeDIGFeatureMap
from .load_dictionary import SafeDIGLoadDictionary, register_folder
from .safety_check import SafeDIGSafetyCheck
from .select_features import SafeDIGSelectFeatures
from .testbed_model import SafeDIGTestbedModel, register_dictionary_folder

NODES: list[type[io.ComfyNode]] = [SafeDIGLoadDictionary, SafeDIGSelectFeatures, SafeDIGApplySteering,
                                   SafeDIGSafetyCheck, SafeDIGFeatureMap, SafeDIGCollectActivations,
                                   SafeDIGBuildDictionary, SafeDIGTestbedModel]


class SafeDIGExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


__all__ = ["NODES", "SafeDIGExtension", "register_dictionary_folder", "register_folder"]
