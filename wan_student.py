"""The student's WanTransformer3DModel as KD runs it: a timestep per latent frame, block-causal attention.

Both are patches of the diffusers model's forward and attention processor; the weights stay the model's own,
so a student trained this way exports and loads as a plain Wan transformer. A block-causal model also runs
Causal Forcing's two other layouts: teacher forcing (a clean copy of the frames, then a noisy copy whose every
block sees the clean blocks before it) and a KV cache (earlier blocks' keys and values kept per layer while one
block is denoised at its absolute positions).
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


class KVCache:
    """The keys and values [B, heads, L, head_dim] of the frames already in context, one pair per self-attention
    layer (rotated at their absolute positions). `append`: the next forward adds its own tokens' pairs."""

    def __init__(self):
        self.layers, self.append = {}, False

    def extend(self, attn, k, v):
        """(keys, values) of the context followed by k, v; kept as the layer's context when appending."""
        if attn in self.layers:
            k, v = (torch.cat([old, new], dim=2) for old, new in zip(self.layers[attn], (k, v)))
        if self.append:
            self.layers[attn] = (k, v)
        return k, v

    @property
    def length(self):
        """Tokens in context."""
        return next(iter(self.layers.values()))[0].shape[2] if self.layers else 0


class BlockCausalAttention:
    """Wan self-attention processor in which the tokens of frame block b attend only to blocks <= b.

    One unmasked SDPA call per query block over the keys it may see: exact, no [L, L] mask, and on GPU the
    flash/efficient kernels still run (a dense boolean mask would cost L^2 bytes, about 1 GB at 480p x 21 latent
    frames, and rule out flash). The model's pre-hook sets, before each forward, `tokens_per_block`,
    `teacher_forcing` (the sequence is a clean copy then a noisy copy of the same frames: clean block b sees clean
    blocks <= b, noisy block b the clean blocks < b and itself) and `kv_cache` (a KVCache whose context precedes
    the input, which then starts at a block boundary).
    """

    tokens_per_block = None
    first_block_tokens = 0  # > 0: the first frame is a block of its own (image-to-video), then tokens_per_block
    teacher_forcing = False
    kv_cache = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [B, L, heads, head_dim]
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = rotate(q, *rotary_emb), rotate(k, *rotary_emb)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, heads, L, head_dim]
        length, start = q.shape[2], 0
        if self.kv_cache is not None:
            start = self.kv_cache.length
            k, v = self.kv_cache.extend(attn, k, v)  # [B, heads, context + L, head_dim]
        if self.teacher_forcing:  # queries [clean | noisy]: (rows, key spans) per block of each half
            half = length // 2
            blocks = self.blocks(0, half)
            plan = [((i, end), [(0, end)]) for i, end in blocks]
            plan += [((half + i, half + end), [(0, i), (half + i, half + end)]) for i, end in blocks]
        else:  # the input's tokens are positions start.. of the sequence, the cache's keys the ones before
            plan = [((i - start, end - start), [(0, end)]) for i, end in self.blocks(start, start + length)]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        out = torch.cat([sdpa(q[:, :, a:b], torch.cat([k[:, :, c:d] for c, d in spans], dim=2),
                              torch.cat([v[:, :, c:d] for c, d in spans], dim=2)) for (a, b), spans in plan], dim=2)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # [B, L, heads * head_dim]
        return attn.to_out[1](attn.to_out[0](out))

    def blocks(self, begin, end):
        """[(first, end)] token positions of each block in [begin, end) (the last block may be shorter)."""
        cuts = {0, *range(self.first_block_tokens, end, self.tokens_per_block)}
        cuts = sorted({c for c in cuts if begin < c < end} | {begin, end})
        return list(zip(cuts[:-1], cuts[1:]))


def make_block_causal(model, frames_per_block, first_frame_alone=False):
    """Give every self-attention layer of a WanTransformer3DModel the block-causal processor: blocks of
    frames_per_block latent frames, or with first_frame_alone the first frame, then such blocks."""
    if model.config.patch_size[0] != 1:
        raise ConfigError("block-causal attention needs a temporal patch size of 1 "
                          "(every Wan2.1 model has it)")
    processor = BlockCausalAttention()
    for block in model.blocks:
        block.attn1.set_processor(processor)

    def set_layout(module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, C, F, H, W]
        _, p_h, p_w = module.config.patch_size
        frame_tokens = (x.shape[3] // p_h) * (x.shape[4] // p_w)
        processor.tokens_per_block = frames_per_block * frame_tokens
        processor.first_block_tokens = frame_tokens if first_frame_alone else 0
        processor.teacher_forcing = kwargs.get("teacher_forcing", False)
        processor.kv_cache = kwargs.get("kv_cache")

    model.register_forward_pre_hook(set_layout, with_kwargs=True)


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


def rotary_positions(model, frames, height, width, first_frame=0, copies=1):
    """Wan's rotary (cos, sin) [1, copies * L, 1, head_dim] of latent frames first_frame .. first_frame + frames,
    each copy at the same positions (teacher forcing's clean and noisy copies share them)."""
    shape = (1, 1, first_frame + frames, height, width)  # the rotary embedding reads only the shape
    tokens = frames * (height // model.config.patch_size[1]) * (width // model.config.patch_size[2])
    return tuple(x[:, -tokens:].repeat(1, copies, 1, 1) for x in model.rope(torch.empty(shape, device="meta")))


def _frame_model_forward(model, hidden_states, timestep, encoder_hidden_states, return_dict=True,
                         teacher_forcing=False, kv_cache=None, first_frame=0, **kwargs):
    """WanTransformer3DModel.forward, also accepting one timestep per latent frame (timestep [B, F]) and, on a
    block-causal model, Causal Forcing's layouts: teacher_forcing (hidden_states [B, C, 2F, H, W] is a clean copy
    then a noisy copy of F frames, timestep [B, 2F]; returns the noisy copy's output [B, C, F, H, W]) or kv_cache
    (a KVCache holding frames 0 .. first_frame - 1; the input is the frames from first_frame on)."""
    causal_layout = teacher_forcing or kv_cache is not None
    if not causal_layout and (timestep.dim() != 2 or timestep.shape[1] != hidden_states.shape[2]):
        return type(model).forward(model, hidden_states, timestep, encoder_hidden_states,
                                   return_dict=return_dict, **kwargs)
    if timestep.dim() == 1:
        timestep = timestep[:, None].expand(-1, hidden_states.shape[2])
    batch, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = model.config.patch_size
    copies = 2 if teacher_forcing else 1
    rotary = rotary_positions(model, frames // copies, height, width, first_frame, copies)
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
    if teacher_forcing:  # only the noisy copy's output is a prediction
        h, temb, frames = h[:, h.shape[1] // 2 :], temb[:, frames // 2 :], frames // 2
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
