"""Running a node as ComfyUI's executor does: `execution.get_output_data` (the V3 class clone, the locked
execute, the node context) inside `torch.inference_mode()`, as `PromptExecutor.execute_async` runs every
prompt. Calling `execute()` directly skips both, and let a node that could not work in ComfyUI pass its tests."""
from __future__ import annotations

import asyncio
import itertools

import torch

_ids = itertools.count()


def run_node(comfy, class_type: str, **inputs):
    """The node's outputs (a tuple, one value per output socket) and its ui dict, as the executor sees them."""
    import execution

    cls = comfy.NODE_CLASS_MAPPINGS[class_type]
    uid = f"n{next(_ids)}"
    with torch.inference_mode():
        output, ui, has_subgraph, pending = asyncio.run(execution.get_output_data(
            "safedig-test-prompt", uid, cls, {k: [v] for k, v in inputs.items()}, hidden_inputs={}))
    assert not has_subgraph and not pending
    return tuple(o[0] for o in output), ui


class FakeClip:
    """A CLIP stand-in with ComfyUI's encoding calls, backed by the tiny encoder's text states."""

    def __init__(self, family):
        from safedig_core.adapters.comfy.runner import tiny_encoder

        self.family = family
        self.encode = tiny_encoder(family)

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens, add_dict=None):
        cond = self.encode(tokens)[0]
        return [[c, {**d, **(add_dict or {})}] for c, d in cond]
