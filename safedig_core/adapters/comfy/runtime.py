"""ComfyUI as a library: find it, import it headless, read a model's DiT layout, build tiny models.

The ComfyUI adapter's entry point: the collection runner, the Feature Map, the testbed, the CLI and the nodes
reach ComfyUI through it (`bootstrap`, `layout_of`, `steer_model`, `recording_model`); nothing below the
adapters imports it. ComfyUI is found at `$COMFYUI_PATH`, else in the project's `.cache/comfyui` (made by
`scripts/setup.sh`).
"""
from __future__ import annotations

import os
import sys

import torch

from ...positions import INPUT_KINDS, ModelLayout

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class ComfyUINotFound(RuntimeError):
    pass


def comfyui_path() -> str:
    path = os.environ.get("COMFYUI_PATH") or os.path.join(REPO, ".cache", "comfyui")
    if not os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
        raise ComfyUINotFound(f"no ComfyUI at {path}: run scripts/setup.sh, or set COMFYUI_PATH to your ComfyUI folder")
    return path


def bootstrap(cpu: bool | None = None) -> str:
    """Make `import comfy` work in this process; on a machine without CUDA, run ComfyUI on the CPU."""
    path = comfyui_path()
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu:
        comfy.cli_args.args.cpu = True  # must precede the first import of comfy.model_management
    return path


def layout_of(model) -> ModelLayout:
    """The DiT layout of a ModelPatcher (preferred: its model_base class names the family and variant), a
    model_base or a bare diffusion model; see `families`."""
    from .families import layout_of as family_layout

    return family_layout(model)


def _init_weights(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """ComfyUI's operations skip weight init; give every parameter reproducible random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("scale") or (name.endswith("weight") and p.ndim == 1):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for _, b in sorted(module.named_buffers()):  # e.g. MMDiT's pos_embed, otherwise uninitialised memory
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g) * std)


def tiny_flux(seed: int = 0, depth: int = 2, single: int = 2, hidden: int = 64, heads: int = 2,
              context_dim: int = 64, vec_dim: int = 768):
    """A random-weight FLUX.1 (dev layout: guidance embedding) wrapped in a ModelPatcher."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    pe = hidden // heads
    third = (pe * 7 // 16) // 2 * 2  # FLUX splits its 128 RoPE dims as 16/56/56; keep the proportion
    axes = [pe - 2 * third, third, third]
    cfg = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": vec_dim,
           "context_in_dim": context_dim, "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads,
           "depth": depth, "depth_single_blocks": single, "axes_dim": axes, "theta": 10000,
           "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
    conf = comfy.supported_models.Flux(params_compat(cfg))
    conf.set_inference_dtype(torch.float32, torch.float32)
    model = conf.get_model({})
    _init_weights(model.diffusion_model, seed)
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=comfy.model_management.unet_offload_device())


def params_compat(cfg: dict) -> dict:
    """`cfg` plus what the installed ComfyUI's FLUX/Chroma params require beyond 0.3.75: newer releases make
    `txt_ids_dims` (the RoPE axes that number text tokens) a required field: none for FLUX.1 and Chroma, axis 3
    for Flux.2, as ComfyUI's model detection sets them."""
    import dataclasses

    import comfy.ldm.chroma.model
    import comfy.ldm.flux.model

    params = comfy.ldm.chroma.model.ChromaParams if cfg.get("image_model") == "chroma" else comfy.ldm.flux.model.FluxParams
    fields = {f.name for f in dataclasses.fields(params)}
    out = dict(cfg)
    if "txt_ids_dims" in fields and "txt_ids_dims" not in out:
        out["txt_ids_dims"] = [3] if cfg.get("image_model") == "flux2" else []
    return out


def _patcher(conf, seed: int):
    import comfy.model_management
    import comfy.model_patcher

    conf.set_inference_dtype(torch.float32, torch.float32)
    model = conf.get_model({})
    _init_weights(model.diffusion_model, seed)
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=comfy.model_management.unet_offload_device())


def tiny_flux_schnell(seed: int = 0, depth: int = 2, single: int = 2, hidden: int = 64, heads: int = 2,
                      context_dim: int = 64, vec_dim: int = 768):
    """A random-weight FLUX.1 schnell (no guidance embedding; ComfyUI's FluxSchnell config)."""
    import comfy.supported_models

    pe = hidden // heads
    third = (pe * 7 // 16) // 2 * 2
    cfg = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": vec_dim,
           "context_in_dim": context_dim, "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads,
           "depth": depth, "depth_single_blocks": single, "axes_dim": [pe - 2 * third, third, third],
           "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": False}
    return _patcher(comfy.supported_models.FluxSchnell(params_compat(cfg)), seed)


def tiny_chroma(seed: int = 0, depth: int = 2, single: int = 2, hidden: int = 64, heads: int = 2,
                context_dim: int = 64):
    """A random-weight Chroma (FLUX.1's block layout, a distilled modulation approximator, no pooled vector;
    16 latent channels, patch size 2: ComfyUI's Chroma config counts in_channels after patchifying, 64) in a
    ModelPatcher."""
    import comfy.supported_models

    pe = hidden // heads
    third = (pe * 7 // 16) // 2 * 2
    cfg = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": context_dim,
           "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads, "depth": depth,
           "depth_single_blocks": single, "axes_dim": [pe - 2 * third, third, third], "theta": 10000,
           "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": hidden, "hidden_dim": 32, "n_layers": 1}
    return _patcher(comfy.supported_models.Chroma(params_compat(cfg)), seed)


def tiny_flux2(seed: int = 0, depth: int = 2, single: int = 2, hidden: int = 64, heads: int = 2,
               context_dim: int = 64):
    """A random-weight Flux.2 (global modulation, no pooled vector, 128 latent channels at 16× downsampling,
    patch size 1, text left-padded to 512 tokens by ComfyUI) in a ModelPatcher."""
    import comfy.supported_models

    pe = hidden // heads
    cfg = {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
           "context_in_dim": context_dim, "hidden_size": hidden, "mlp_ratio": 3.0, "num_heads": heads,
           "depth": depth, "depth_single_blocks": single, "axes_dim": [pe // 4] * 4, "theta": 2000,
           "patch_size": 1, "qkv_bias": False, "guidance_embed": True, "global_modulation": True,
           "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0}
    return _patcher(comfy.supported_models.Flux2(params_compat(cfg)), seed)


def tiny_qwen_image(seed: int = 0, layers: int = 2, heads: int = 2, head_dim: int = 32, context_dim: int = 64):
    """A random-weight Qwen-Image (double-stream blocks only, width heads × head_dim, 16-channel 5-D latent
    [B, 16, 1, H, W], patch 2) in a ModelPatcher."""
    import comfy.supported_models

    third = (head_dim * 7 // 16) // 2 * 2
    cfg = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
           "num_layers": layers, "attention_head_dim": head_dim, "num_attention_heads": heads,
           "joint_attention_dim": context_dim, "axes_dims_rope": (head_dim - 2 * third, third, third)}
    return _patcher(comfy.supported_models.QwenImage(cfg), seed)


def tiny_wan(seed: int = 0, layers: int = 2, dim: int = 64, heads: int = 2, context_dim: int = 64):
    """A random-weight Wan 2.1 text-to-video (blocks return the image stream only; text by cross-attention;
    16-channel 5-D latent [B, 16, T, H, W], patch 1×2×2) in a ModelPatcher."""
    import comfy.supported_models

    cfg = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "out_dim": 16,
           "dim": dim, "ffn_dim": 2 * dim, "freq_dim": 256, "text_dim": context_dim, "num_heads": heads,
           "num_layers": layers, "text_len": 512}
    return _patcher(comfy.supported_models.WAN21_T2V(cfg), seed)


def tiny_lumina2(seed: int = 0, layers: int = 2, dim: int = 64, heads: int = 2, context_dim: int = 64):
    """A random-weight Lumina 2 (NextDiT: caption and noise refiners, then joint layers over [caption | img];
    16-channel latent, patch 2; no block-replace protocol in ComfyUI) in a ModelPatcher."""
    import comfy.supported_models

    pe = dim // heads
    cfg = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": dim, "cap_feat_dim": context_dim,
           "n_layers": layers, "n_refiner_layers": 1, "qk_norm": True, "n_heads": heads, "n_kv_heads": heads,
           "axes_dims": [pe - 2 * (pe // 3), pe // 3, pe // 3], "axes_lens": [300, 512, 512], "rope_theta": 10000.0,
           "ffn_dim_multiplier": 4.0, "multiple_of": 16}
    return _patcher(comfy.supported_models.Lumina2(cfg), seed)


def tiny_z_image(seed: int = 0, layers: int = 2, dim: int = 256, heads: int = 4, context_dim: int = 64):
    """A random-weight Z-Image (NextDiT with Z-Image's modulation; caption and image each padded to a multiple
    of 32 tokens; its timestep embedding needs dim >= 256) in a ModelPatcher."""
    import comfy.supported_models

    pe = dim // heads
    cfg = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": dim, "cap_feat_dim": context_dim,
           "n_layers": layers, "n_refiner_layers": 1, "qk_norm": True, "n_heads": heads, "n_kv_heads": heads,
           "axes_dims": [pe - 2 * (3 * pe // 8), 3 * pe // 8, 3 * pe // 8], "axes_lens": [1536, 512, 512],
           "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
           "pad_tokens_multiple": 32, "multiple_of": 16}
    return _patcher(comfy.supported_models.ZImage(cfg), seed)


def tiny_hunyuan_image(seed: int = 0, depth: int = 2, single: int = 2, hidden: int = 64, heads: int = 2,
                       context_dim: int = 64, byt5: bool = False):
    """A random-weight HunyuanImage 2.1 (double and single blocks, single stream [img | txt] image first;
    64-channel latent at 32x downsampling, patch 1) in a ModelPatcher."""
    import comfy.supported_models

    pe = hidden // heads
    cfg = {"image_model": "hunyuan_video", "in_channels": 64, "out_channels": 64, "patch_size": [1, 1],
           "vec_in_dim": None, "axes_dim": [pe // 2, pe // 2], "meanflow": False, "context_in_dim": context_dim,
           "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads, "depth": depth,
           "depth_single_blocks": single, "theta": 256, "qkv_bias": True, "byt5": byt5, "guidance_embed": False,
           "use_cond_type_embedding": False, "vision_in_dim": None}
    return _patcher(comfy.supported_models.HunyuanImage21(cfg), seed)


def tiny_hidream(seed: int = 0, depth: int = 2, single: int = 2, heads: int = 2, head_dim: int = 32,
                 context_dim: int = 64, llama_layers: int = 4):
    """A random-weight HiDream (double and single blocks with mixture-of-experts FFNs; text from T5 and
    `llama_layers` Llama layers, conditioning key `conditioning_llama3` [B, layers, T, C]; 16-channel latent,
    patch 2; no block-replace protocol in ComfyUI) in a ModelPatcher."""
    import comfy.supported_models

    cfg = {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": depth,
           "num_single_layers": single, "attention_head_dim": head_dim, "num_attention_heads": heads,
           "caption_channels": [context_dim, context_dim], "text_emb_dim": context_dim, "num_routed_experts": 4,
           "num_activated_experts": 2, "axes_dims_rope": [head_dim // 2, head_dim // 4, head_dim // 4],
           "max_resolution": [32, 32], "llama_layers": [i % llama_layers for i in range(depth + single)]}
    return _patcher(comfy.supported_models.HiDream(cfg), seed)


def tiny_sd3(seed: int = 0, depth: int = 2, context_dim: int = 64, adm_dim: int = 2048):
    """A random-weight SD3 MMDiT (width 64·depth; the last block context-pre-only) in a ModelPatcher."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cfg = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
           "adm_in_channels": adm_dim, "num_patches": 64 * 64, "pos_embed_max_size": 64,
           "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
           "context_embedder_config": {"target": "torch.nn.Linear",
                                       "params": {"in_features": context_dim, "out_features": 64 * depth}}}
    conf = comfy.supported_models.SD3(cfg)
    conf.set_inference_dtype(torch.float32, torch.float32)
    model = conf.get_model({})
    _init_weights(model.diffusion_model, seed)
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=comfy.model_management.unet_offload_device())


def conditioning(context: torch.Tensor, pooled: torch.Tensor, **extra) -> list:
    """ComfyUI CONDITIONING from text states [B, T, C] and a pooled vector [B, P]."""
    return [[context, {"pooled_output": pooled, **extra}]]


def sample(model, positive, negative, latent: torch.Tensor, seed: int = 0, steps: int = 3, cfg: float = 2.0,
           sampler: str = "euler", scheduler: str = "simple", denoise: float = 1.0) -> torch.Tensor:
    """KSampler, exactly as the node runs it; returns the denoised latent."""
    import nodes

    out = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative,
                                {"samples": latent}, denoise=denoise, disable_noise=False)
    return out[0]["samples"]


def patched(model, positions, make, layout=None):
    """A clone of ModelPatcher `model` with one patch per block of `positions` (see patches.install), and,
    for the families that need it, the wrapper that tells the patches where image tokens end. The input model
    is untouched."""
    import comfy.patcher_extension

    from .families import add_block_slots, patch_key, steer_inputs, token_layout_wrapper
    from .patches import WRAPPER_KEY, install

    layout = layout or layout_of(model)
    m = model.clone()

    def existing(slot):
        return m.model_options["transformer_options"].get("patches_replace", {}).get(patch_key(layout.family, slot), {}).get(slot)

    install(lambda patch, slot: m.set_model_patch_replace(patch, patch_key(layout.family, slot), *slot), existing,
            positions, make)
    add_block_slots(m, layout.family, positions)
    wrappers = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    wrapper = token_layout_wrapper(layout.family)
    if wrapper is not None and not m.get_wrappers(wrappers, WRAPPER_KEY):
        m.add_wrapper_with_key(wrappers, WRAPPER_KEY, wrapper)
    if any(p.kind in INPUT_KINDS for p in positions) and not m.get_wrappers(wrappers, WRAPPER_KEY + "_input"):
        m.add_wrapper_with_key(wrappers, WRAPPER_KEY + "_input", steer_inputs)
    return m


def steer_model(model, store, positions, cfg, layout=None):
    """A clone of `model` that steers at `positions` through `store`; the node and the CLI both come here.
    With a per-image gate detecting elsewhere (`cfg.detect`), the detecting positions get patches too."""
    from ...gate import plan
    from .memory import track
    from .patches import BlockSteering, SharedGate

    gate = SharedGate(plan(cfg, list(positions), sorted(store.steerers)))
    m = patched(model, gate.plan.positions, lambda ps, prev: BlockSteering(store, ps, cfg, prev, gate), layout)
    if not cfg.is_identity:
        track(m, store, gate.plan.positions)  # ComfyUI's model management counts and moves the SAE weights
    return m


def recording_model(model, positions, record, layout=None):
    """A clone of `model` that hands the streams at `positions` to `record(position, x, transformer_options)`."""
    from .patches import BlockRecorder

    return patched(model, positions, lambda ps, prev: BlockRecorder(record, ps, prev), layout)
