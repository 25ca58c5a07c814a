"""Diffusers transformer weights → ComfyUI's module of the same family, so that a test can run one set of
weights in both runtimes.

FLUX.1 and SD3 go through ComfyUI's own diffusers key map (`comfy.model_detection.convert_diffusers_mmdit`,
what ComfyUI runs on diffusers checkpoints). ComfyUI 0.3.75 has no such map for Chroma, Flux.2, Wan, HunyuanImage
2.1, Lumina 2 or Z-Image, so this module holds one for each, read from the two implementations (diffusers 0.42.1,
ComfyUI 0.3.75); Qwen-Image's and HiDream's ComfyUI modules use diffusers' own names. A table row is `comfy name: [diffusers names]`, the diffusers
tensors concatenated along dim 0 (ComfyUI fuses q, k, v and, in single blocks, the MLP input); each name is a
whole key or a module prefix taking its `.weight` and `.bias`. `to_comfy` refuses a state dict with keys the
table leaves over, and the caller loads the result with `strict=True`, so a missing or stray key fails loudly.
"""
from __future__ import annotations

import torch

SUFFIXES = ("", ".weight", ".bias")


def _apply(state: dict, table: dict) -> dict:
    out, used = {}, set()
    for to, froms in table.items():
        for end in SUFFIXES:
            keys = [f + end for f in froms]
            if all(k in state for k in keys):
                out[to + end] = torch.cat([state[k] for k in keys]) if len(keys) > 1 else state[keys[0]]
                used.update(keys)
    left = sorted(set(state) - used)
    if left:
        raise KeyError(f"diffusers keys the map does not convert: {left}")
    return out


def _count(state: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous computes (scale, shift); ComfyUI's LastLayer (shift, scale)."""
    scale, shift = t.chunk(2)
    return torch.cat([shift, scale])


def _flux_double(d: str, c: str, mlp_in: str, mlp_out: str) -> dict:
    """One double block of the FLUX-style families (Chroma, Flux.2): q, k, v fused per stream."""
    a = f"{d}.attn"
    return {f"{c}.img_attn.qkv": [f"{a}.to_q", f"{a}.to_k", f"{a}.to_v"],
            f"{c}.txt_attn.qkv": [f"{a}.add_q_proj", f"{a}.add_k_proj", f"{a}.add_v_proj"],
            f"{c}.img_attn.proj": [f"{a}.to_out.0"], f"{c}.txt_attn.proj": [f"{a}.to_add_out"],
            f"{c}.img_attn.norm.query_norm.scale": [f"{a}.norm_q.weight"],
            f"{c}.img_attn.norm.key_norm.scale": [f"{a}.norm_k.weight"],
            f"{c}.txt_attn.norm.query_norm.scale": [f"{a}.norm_added_q.weight"],
            f"{c}.txt_attn.norm.key_norm.scale": [f"{a}.norm_added_k.weight"],
            f"{c}.img_mlp.0": [f"{d}.ff.{mlp_in}"], f"{c}.img_mlp.2": [f"{d}.ff.{mlp_out}"],
            f"{c}.txt_mlp.0": [f"{d}.ff_context.{mlp_in}"], f"{c}.txt_mlp.2": [f"{d}.ff_context.{mlp_out}"]}


def _single_norms(d: str, c: str) -> dict:
    return {f"{c}.norm.query_norm.scale": [f"{d}.attn.norm_q.weight"],
            f"{c}.norm.key_norm.scale": [f"{d}.attn.norm_k.weight"]}


def chroma(state: dict) -> dict:
    """Chroma: FLUX.1's blocks without modulation layers, plus the distilled guidance approximator."""
    table = {"img_in": ["x_embedder"], "txt_in": ["context_embedder"], "final_layer.linear": ["proj_out"],
             "distilled_guidance_layer.in_proj": ["distilled_guidance_layer.in_proj"],
             "distilled_guidance_layer.out_proj": ["distilled_guidance_layer.out_proj"]}
    for i in range(_count(state, "distilled_guidance_layer.layers.")):
        g = "distilled_guidance_layer"
        table[f"{g}.layers.{i}.in_layer"] = [f"{g}.layers.{i}.linear_1"]
        table[f"{g}.layers.{i}.out_layer"] = [f"{g}.layers.{i}.linear_2"]
        table[f"{g}.norms.{i}.scale"] = [f"{g}.norms.{i}.weight"]
    for i in range(_count(state, "transformer_blocks.")):
        table.update(_flux_double(f"transformer_blocks.{i}", f"double_blocks.{i}", "net.0.proj", "net.2"))
    for i in range(_count(state, "single_transformer_blocks.")):
        d, c = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        table[f"{c}.linear1"] = [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"]
        table[f"{c}.linear2"] = [f"{d}.proj_out"]
        table.update(_single_norms(d, c))
    return _apply(state, table)


def flux2(state: dict) -> dict:
    """Flux.2: global modulation layers, SwiGLU MLPs, single blocks with one fused qkv + MLP projection."""
    t = "time_guidance_embed"
    table = {"img_in": ["x_embedder"], "txt_in": ["context_embedder"], "final_layer.linear": ["proj_out"],
             "time_in.in_layer": [f"{t}.timestep_embedder.linear_1"],
             "time_in.out_layer": [f"{t}.timestep_embedder.linear_2"],
             "guidance_in.in_layer": [f"{t}.guidance_embedder.linear_1"],
             "guidance_in.out_layer": [f"{t}.guidance_embedder.linear_2"],
             "double_stream_modulation_img.lin": ["double_stream_modulation_img.linear"],
             "double_stream_modulation_txt.lin": ["double_stream_modulation_txt.linear"],
             "single_stream_modulation.lin": ["single_stream_modulation.linear"]}
    for i in range(_count(state, "transformer_blocks.")):
        table.update(_flux_double(f"transformer_blocks.{i}", f"double_blocks.{i}", "linear_in", "linear_out"))
    for i in range(_count(state, "single_transformer_blocks.")):
        d, c = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        table[f"{c}.linear1"] = [f"{d}.attn.to_qkv_mlp_proj"]
        table[f"{c}.linear2"] = [f"{d}.attn.to_out"]
        table.update(_single_norms(d, c))
    return _final_swapped(state, table)


def wan(state: dict) -> dict:
    """Wan 2.x: diffusers' `norm2` (before cross-attention) is ComfyUI's `norm3`; the block's and the head's
    `scale_shift_table` are ComfyUI's `modulation`."""
    e = "condition_embedder"
    table = {"patch_embedding": ["patch_embedding"], "head.head": ["proj_out"], "head.modulation": ["scale_shift_table"],
             "text_embedding.0": [f"{e}.text_embedder.linear_1"], "text_embedding.2": [f"{e}.text_embedder.linear_2"],
             "time_embedding.0": [f"{e}.time_embedder.linear_1"], "time_embedding.2": [f"{e}.time_embedder.linear_2"],
             "time_projection.1": [f"{e}.time_proj"]}
    for i in range(_count(state, "blocks.")):
        d, c = f"blocks.{i}", f"blocks.{i}"
        for mine, theirs in (("attn1", "self_attn"), ("attn2", "cross_attn")):
            for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"), ("norm_q", "norm_q"),
                         ("norm_k", "norm_k")):
                table[f"{c}.{theirs}.{b}"] = [f"{d}.{mine}.{a}"]
        table.update({f"{c}.norm3": [f"{d}.norm2"], f"{c}.ffn.0": [f"{d}.ffn.net.0.proj"],
                      f"{c}.ffn.2": [f"{d}.ffn.net.2"], f"{c}.modulation": [f"{d}.scale_shift_table"]})
    return _apply(state, table)


def hunyuan_image(state: dict) -> dict:
    """HunyuanImage 2.1: FLUX.1's double and single blocks (image first in both runtimes), a token refiner in
    front of the text stream, optionally the byT5 projection."""
    r, t = "context_embedder", "time_guidance_embed"
    table = {"img_in.proj": ["x_embedder.proj"], "final_layer.linear": ["proj_out"],
             "time_in.in_layer": [f"{t}.timestep_embedder.linear_1"], "time_in.out_layer": [f"{t}.timestep_embedder.linear_2"],
             "guidance_in.in_layer": [f"{t}.guidance_embedder.linear_1"],
             "guidance_in.out_layer": [f"{t}.guidance_embedder.linear_2"],
             "time_r_in.in_layer": [f"{t}.timestep_embedder_r.linear_1"],
             "time_r_in.out_layer": [f"{t}.timestep_embedder_r.linear_2"],
             "txt_in.input_embedder": [f"{r}.proj_in"],
             "txt_in.t_embedder.in_layer": [f"{r}.time_text_embed.timestep_embedder.linear_1"],
             "txt_in.t_embedder.out_layer": [f"{r}.time_text_embed.timestep_embedder.linear_2"],
             "txt_in.c_embedder.in_layer": [f"{r}.time_text_embed.text_embedder.linear_1"],
             "txt_in.c_embedder.out_layer": [f"{r}.time_text_embed.text_embedder.linear_2"],
             "byt5_in.layernorm": ["context_embedder_2.norm"], "byt5_in.fc1": ["context_embedder_2.linear_1"],
             "byt5_in.fc2": ["context_embedder_2.linear_2"], "byt5_in.fc3": ["context_embedder_2.linear_3"]}
    for i in range(_count(state, f"{r}.token_refiner.refiner_blocks.")):
        d, c = f"{r}.token_refiner.refiner_blocks.{i}", f"txt_in.individual_token_refiner.blocks.{i}"
        table.update({f"{c}.norm1": [f"{d}.norm1"], f"{c}.norm2": [f"{d}.norm2"],
                      f"{c}.self_attn.qkv": [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"],
                      f"{c}.self_attn.proj": [f"{d}.attn.to_out.0"], f"{c}.mlp.0": [f"{d}.ff.net.0.proj"],
                      f"{c}.mlp.2": [f"{d}.ff.net.2"], f"{c}.adaLN_modulation.1": [f"{d}.norm_out.linear"]})
    for i in range(_count(state, "transformer_blocks.")):
        d, c = f"transformer_blocks.{i}", f"double_blocks.{i}"
        table.update(_flux_double(d, c, "net.0.proj", "net.2"))
        table.update({f"{c}.img_mod.lin": [f"{d}.norm1.linear"], f"{c}.txt_mod.lin": [f"{d}.norm1_context.linear"]})
    for i in range(_count(state, "single_transformer_blocks.")):
        d, c = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        table[f"{c}.linear1"] = [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"]
        table[f"{c}.linear2"] = [f"{d}.proj_out"]
        table[f"{c}.modulation.lin"] = [f"{d}.norm.linear"]
        table.update(_single_norms(d, c))
    return _final_swapped(state, table)


def _final_swapped(state: dict, table: dict) -> dict:
    """`table` applied, diffusers' final AdaLayerNormContinuous (scale, shift) as ComfyUI's LastLayer (shift, scale)."""
    state = dict(state)
    final = {k: _swap_halves(state.pop(k)) for k in [k for k in state if k.startswith("norm_out.linear.")]}
    out = _apply(state, table)
    out.update({k.replace("norm_out.linear", "final_layer.adaLN_modulation.1"): v for k, v in final.items()})
    return out


def _nextdit_block(d: str, c: str, attn: str) -> dict:
    """One NextDiT block (Lumina 2's `attn`, Z-Image's `attention`): ComfyUI fuses q, k, v."""
    a = f"{d}.{attn}"
    return {f"{c}.attention.qkv": [f"{a}.to_q", f"{a}.to_k", f"{a}.to_v"], f"{c}.attention.out": [f"{a}.to_out.0"],
            f"{c}.attention.q_norm": [f"{a}.norm_q"], f"{c}.attention.k_norm": [f"{a}.norm_k"]}


def _nextdit_blocks(state: dict, block) -> dict:
    table = {}
    for stack in ("noise_refiner", "context_refiner", "layers"):
        for i in range(_count(state, f"{stack}.")):
            table.update(block(f"{stack}.{i}", f"{stack}.{i}"))
    return table


def _unused_final_norm(out: dict) -> dict:
    """ComfyUI's NextDiT holds a `norm_final` its forward never uses; diffusers has none."""
    w = out["final_layer.linear.weight"]
    out["norm_final.weight"] = torch.ones(w.shape[1], dtype=w.dtype)
    return out


def lumina2(state: dict) -> dict:
    """Lumina 2 (NextDiT): diffusers' LuminaRMSNormZero is ComfyUI's attention_norm1 and adaLN_modulation."""
    e = "time_caption_embed"

    def block(d, c):
        return {**_nextdit_block(d, c, "attn"), f"{c}.attention_norm1": [f"{d}.norm1"],
                f"{c}.adaLN_modulation.1": [f"{d}.norm1.linear"], f"{c}.attention_norm2": [f"{d}.norm2"],
                f"{c}.ffn_norm1": [f"{d}.ffn_norm1"], f"{c}.ffn_norm2": [f"{d}.ffn_norm2"],
                f"{c}.feed_forward.w1": [f"{d}.feed_forward.linear_1"], f"{c}.feed_forward.w2": [f"{d}.feed_forward.linear_2"],
                f"{c}.feed_forward.w3": [f"{d}.feed_forward.linear_3"]}

    state = dict(state)
    for k in [k for k in state if ".norm1.norm." in k]:  # modulated blocks: the RMSNorm inside norm1
        state[k.replace(".norm1.norm.", ".norm1.")] = state.pop(k)
    table = {"x_embedder": ["x_embedder"], "t_embedder.mlp.0": [f"{e}.timestep_embedder.linear_1"],
             "t_embedder.mlp.2": [f"{e}.timestep_embedder.linear_2"], "cap_embedder.0": [f"{e}.caption_embedder.0"],
             "cap_embedder.1": [f"{e}.caption_embedder.1"], "final_layer.linear": ["norm_out.linear_2"],
             "final_layer.adaLN_modulation.1": ["norm_out.linear_1"], **_nextdit_blocks(state, block)}
    return _unused_final_norm(_apply(state, table))


def z_image(state: dict) -> dict:
    """Z-Image (NextDiT with Z-Image's modulation): one patch size (2, frames 1), names as ComfyUI's but the
    attention's."""
    def block(d, c):
        same = ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2", "adaLN_modulation.0",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
        return {**_nextdit_block(d, c, "attention"), **{f"{c}.{n}": [f"{d}.{n}"] for n in same}}

    x, f = "all_x_embedder.2-1", "all_final_layer.2-1"
    table = {"x_embedder": [x], "final_layer.linear": [f"{f}.linear"],
             "final_layer.adaLN_modulation.1": [f"{f}.adaLN_modulation.1"], "x_pad_token": ["x_pad_token"],
             "cap_pad_token": ["cap_pad_token"], **{f"t_embedder.mlp.{i}": [f"t_embedder.mlp.{i}"] for i in (0, 2)},
             **{f"cap_embedder.{i}": [f"cap_embedder.{i}"] for i in (0, 1)}, **_nextdit_blocks(state, block)}
    return _unused_final_norm(_apply(state, table))


def same_names(state: dict) -> dict:
    """Qwen-Image and HiDream: ComfyUI's module carries diffusers' names."""
    return dict(state)


def flux_or_sd3(state: dict) -> dict:
    import comfy.model_detection

    state = dict(state)
    out = comfy.model_detection.convert_diffusers_mmdit(state, "")
    if state:
        raise KeyError(f"diffusers keys ComfyUI's map did not convert: {sorted(state)}")
    return out


CONVERTERS = {"flux": flux_or_sd3, "sd3": flux_or_sd3, "chroma": chroma, "flux2": flux2, "qwen_image": same_names,
              "wan": wan, "hunyuan_image": hunyuan_image, "lumina2": lumina2, "z_image": z_image, "hidream": same_names}


def to_comfy(family: str, model: torch.nn.Module) -> dict:
    """The weights of diffusers transformer `model` under the names of ComfyUI's module for `family` (Z-Image:
    "z_image", Lumina 2's other NextDiT)."""
    return CONVERTERS[family]({k: v.detach().clone() for k, v in model.state_dict().items()})
