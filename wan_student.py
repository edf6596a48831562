"""The student's WanTransformer3DModel as KD runs it: a timestep per latent frame, block-causal attention.

Both are patches of the diffusers model's forward and attention processor; the weights stay the model's own,
so a student trained this way exports and loads as a plain Wan transformer.
"""

import types

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from errors import ConfigError


def rotate(x, cos, sin):
    """Wan's rotary embedding of x [B, L, heads, head_dim]; cos, sin [1, L, 1, head_dim] (pairs repeated)."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 0::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).type_as(x)


class BlockCausalAttention:
    """Wan self-attention processor in which the tokens of frame block b attend only to blocks <= b.

    One unmasked SDPA call per query block over the prefix of keys it may see: exact, no [L, L] mask, and on
    GPU the flash/efficient kernels still run (a dense boolean mask would cost L^2 bytes, about 1 GB at 480p
    x 21 latent frames, and rule out flash). The model's pre-hook sets `tokens_per_block` before each forward.
    """

    tokens_per_block = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [B, L, heads, head_dim]
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = rotate(q, *rotary_emb), rotate(k, *rotary_emb)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, heads, L, head_dim]
        n = self.tokens_per_block
        sdpa = torch.nn.functional.scaled_dot_product_attention
        out = torch.cat([sdpa(q[:, :, i : i + n], k[:, :, : i + n], v[:, :, : i + n])
                         for i in range(0, q.shape[2], n)], dim=2)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # [B, L, heads * head_dim]
        return attn.to_out[1](attn.to_out[0](out))


def make_block_causal(model, frames_per_block):
    """Give every self-attention layer of a WanTransformer3DModel the block-causal processor."""
    if model.config.patch_size[0] != 1:
        raise ConfigError("block-causal attention needs a temporal patch size of 1 "
                          "(every Wan2.1 model has it)")
    processor = BlockCausalAttention()
    for block in model.blocks:
        block.attn1.set_processor(processor)

    def set_block_size(module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, C, F, H, W]
        _, p_h, p_w = module.config.patch_size
        processor.tokens_per_block = frames_per_block * (x.shape[3] // p_h) * (x.shape[4] // p_w)

    model.register_forward_pre_hook(set_block_size, with_kwargs=True)


def _frame_block_forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb):
    """A Wan block whose modulation temb is per frame [B, F, 6, D], broadcast over each frame's tokens.

    Diffusers' per-token path would materialise [B, L, 6, D] fp32 per block; here it stays [B, F, 6, D].
    """
    if temb.dim() != 4 or temb.shape[1] == hidden_states.shape[1]:
        return type(block).forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb)
    frames = temb.shape[1]
    shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table[:, None] + temb.float()).unbind(2)

    def per_frame(x):  # [B, L, D] -> [B, F, tokens per frame, D]
        return x.unflatten(1, (frames, -1))

    def modulate(norm, x, shift_, scale_):
        modulated = per_frame(norm(x.float())) * (1 + scale_[:, :, None]) + shift_[:, :, None]
        return modulated.flatten(1, 2).type_as(x)

    attn = block.attn1(modulate(block.norm1, hidden_states, shift, scale), None, None, rotary_emb)
    h = per_frame(hidden_states.float()) + per_frame(attn) * gate[:, :, None]
    h = h.flatten(1, 2).type_as(hidden_states)
    h = h + block.attn2(block.norm2(h.float()).type_as(h), encoder_hidden_states, None, None)
    ff = block.ffn(modulate(block.norm3, h, c_shift, c_scale))
    return (per_frame(h.float()) + per_frame(ff.float()) * c_gate[:, :, None]).flatten(1, 2).type_as(h)


def _frame_model_forward(model, hidden_states, timestep, encoder_hidden_states, return_dict=True, **kwargs):
    """WanTransformer3DModel.forward, also accepting one timestep per latent frame: timestep [B, F]."""
    if timestep.dim() != 2 or timestep.shape[1] != hidden_states.shape[2]:
        return type(model).forward(model, hidden_states, timestep, encoder_hidden_states,
                                   return_dict=return_dict, **kwargs)
    batch, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = model.config.patch_size
    rotary = model.rope(hidden_states)
    h = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # [B, L, D]
    # temb [B, F, D], proj [B, F, 6D]: one time embedding per frame
    temb, proj, context, _ = model.condition_embedder(timestep.flatten(), encoder_hidden_states, None,
                                                      timestep_seq_len=frames)
    proj = proj.unflatten(2, (6, -1))  # [B, F, 6, D]
    for block in model.blocks:
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            h = model._gradient_checkpointing_func(block, h, context, proj, rotary)
        else:
            h = block(h, context, proj, rotary)
    shift, scale = (model.scale_shift_table[:, None] + temb[:, :, None]).unbind(2)  # [B, F, D] each
    h = (model.norm_out(h.float()).unflatten(1, (frames, -1)) * (1 + scale[:, :, None]) + shift[:, :, None])
    h = model.proj_out(h.flatten(1, 2).type_as(hidden_states))  # [B, L, C * p_t * p_h * p_w]
    h = h.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    out = h.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)  # [B, C, F, H, W]
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)  # what the stock forward returns


def accept_frame_timesteps(model):
    """Let a WanTransformer3DModel take timestep [B, F], one per latent frame, at the memory cost of [B]."""
    model.forward = types.MethodType(_frame_model_forward, model)
    for block in model.blocks:
        block.forward = types.MethodType(_frame_block_forward, block)
