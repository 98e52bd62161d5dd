"""Diffusers MM-DiTs: Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``) and FLUX.1 (``FluxTransformer2DModel``).

The adapter's model is the *transformer*; ``transformer_of`` resolves a pipeline to it. A DiT has no decoder stack:
its "layers" are its transformer blocks and its attention modules are the blocks' joint-attention modules, whose
processor (``module.processor``) builds one sequence of text and image tokens and attends over it with full,
non-causal attention. Facts from diffusers 0.42 (paths under ``diffusers/models/``):

- SD3 (``transformers/transformer_sd3.py``): ``transformer_blocks[i]`` are ``JointTransformerBlock``
  (``attention.py``). ``block.attn`` is a joint ``attention_processor.Attention`` run by ``JointAttnProcessor2_0``,
  which concatenates ``[image, text]`` (``attention_processor.py``, ``JointAttnProcessor2_0.__call__``:
  ``query = torch.cat([query, encoder_hidden_states_query_proj], dim=2)``). SD3.5 blocks listed in
  ``config.dual_attention_layers`` add ``block.attn2``, a second attention over the *image tokens only*, called
  without ``encoder_hidden_states``. ``attn`` and ``attn2`` of a block share one processor instance. The last block
  is ``context_pre_only``: its text tokens still join the attention, but their output is not projected.
- FLUX (``transformers/transformer_flux.py``): ``transformer_blocks[i]`` (dual-stream) hold a ``FluxAttention``
  whose ``FluxAttnProcessor`` concatenates ``[text, image]`` (``torch.cat([encoder_query, query], dim=1)``);
  ``single_transformer_blocks[i]`` hold a ``FluxAttention`` with no text projections that receives hidden states
  already concatenated ``[text, image]`` by ``FluxSingleTransformerBlock.forward``
  (``torch.cat([encoder_hidden_states, hidden_states], dim=1)``). Each module has its own processor instance.
  RoPE is applied after concatenation; text tokens have position ids 0.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter


def transformer_of(model_or_pipeline) -> nn.Module:
    """The denoising transformer of a diffusers pipeline (``pipe.transformer``), or the model itself."""
    transformer = getattr(model_or_pipeline, "transformer", None)
    return transformer if isinstance(transformer, nn.Module) else model_or_pipeline


class DiTAdapter(Adapter):
    """Shared logic: blocks from ``block_lists``, their ``attn``/``attn2`` modules, spans from ``token_order``."""

    kind = "dit"
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks",)
    """Attribute names of the transformer's block lists, in the order the forward pass runs them."""

    @property
    def text_model(self) -> nn.Module:
        raise UnsupportedModelError(
            f"{type(self.model).__name__} is a diffusion transformer: it has no decoder stack, text config or "
            "attention implementation to switch; use decoder_layers / attention_modules / processors()"
        )

    # ---- blocks and attention modules ----------------------------------------------------------------------------
    @property
    def decoder_layers(self) -> list[nn.Module]:
        """The transformer blocks, in forward order (FLUX: dual-stream blocks, then single-stream blocks)."""
        return [block for name in self.block_lists for block in getattr(self.model, name)]

    @property
    def named_attention_modules(self) -> dict[str, nn.Module]:
        """Name (as in ``model.named_modules()``) -> attention module, in block order, ``attn`` before ``attn2``."""
        found = {}
        for list_name in self.block_lists:
            for index, block in enumerate(getattr(self.model, list_name)):
                for attr in ("attn", "attn2"):
                    module = getattr(block, attr, None)
                    if module is not None:
                        found[f"{list_name}.{index}.{attr}"] = module
        return found

    @property
    def attention_modules(self) -> list[nn.Module]:
        """Every attention module in block order (there is no ``layer_idx``: index into this list instead)."""
        return list(self.named_attention_modules.values())

    def processors(self) -> dict[str, object]:
        """Module name -> the attention processor installed on it now (for wrapping and restoring)."""
        return {name: module.processor for name, module in self.named_attention_modules.items()}

    @property
    def num_heads(self) -> int:
        return self.model.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.model.config.attention_head_dim

    # ---- joint sequence ------------------------------------------------------------------------------------------
    def token_order(self, module: nn.Module) -> tuple[str, ...]:
        """The parts of ``module``'s attention sequence, first to last: ``"text"`` and/or ``"image"``."""
        raise NotImplementedError

    def joint_token_spans(self, module: nn.Module, text_len: int, image_len: int) -> dict[str, slice]:
        """Where the text and image tokens sit along the sequence axis of ``module``'s joint q/k/v.

        ``text_len`` is the number of text tokens (``encoder_hidden_states.shape[1]``), ``image_len`` the number
        of image tokens (``image_grid`` rows x cols). A part the module does not attend over gets an empty slice.
        """
        if not any(module is candidate for candidate in self.attention_modules):
            raise ValueError(f"{type(module).__name__} is not an attention module of this {type(self.model).__name__}")
        lengths = {"text": text_len, "image": image_len}
        spans, start = {}, 0
        for part in self.token_order(module):
            spans[part] = slice(start, start + lengths[part])
            start += lengths[part]
        return {part: spans.get(part, slice(start, start)) for part in ("text", "image")}

    def joint_qkv(self, attn: nn.Module, hidden_states, encoder_hidden_states=None, image_rotary_emb=None):
        """The joint q, k, v (B, H, S, D) the family's stock processor would attend over, in ``token_order``."""
        raise NotImplementedError

    def joint_output(self, attn: nn.Module, out: torch.Tensor, hidden_states, encoder_hidden_states=None):
        """What the stock processor returns, given the joint attention output ``out`` (B, H, S, D)."""
        raise NotImplementedError

    def token_cell(self, vae_scale_factor: int = 8) -> int:
        """The side in pixels of the square one image token covers.

        ``vae_scale_factor`` is the pipeline's ``pipe.vae_scale_factor`` (``2 ** (len(vae.block_out_channels) - 1)``,
        8 for the released VAEs and the pipelines' default).
        """
        raise NotImplementedError

    def image_grid(self, height: int, width: int, vae_scale_factor: int = 8) -> tuple[int, int]:
        """The (rows, cols) of image-token patches for a ``height`` x ``width`` pixel image."""
        cell = self.token_cell(vae_scale_factor)
        return height // cell, width // cell


class SD3Adapter(DiTAdapter):
    family = "sd3"
    model_classes = ("diffusers.models.transformers.transformer_sd3:SD3Transformer2DModel",)
    joint_layout = "image_first"

    def token_order(self, module: nn.Module) -> tuple[str, ...]:
        image_only = any(module is block.attn2 for block in self.decoder_layers)
        return ("image",) if image_only else ("image", "text")

    def joint_qkv(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None):
        """``JointAttnProcessor2_0``: per-stream projections, head split, q/k norms, then ``[image, text]``."""
        batch = hidden_states.shape[0]

        def split(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_q, text_k = split(attn.add_q_proj(encoder_hidden_states)), split(attn.add_k_proj(encoder_hidden_states))
            text_v = split(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key, value = (torch.cat(pair, dim=2) for pair in ((query, text_q), (key, text_k), (value, text_v)))
        return query, key, value

    def joint_output(self, attn, out, hidden_states, encoder_hidden_states=None):
        """Merge heads, split ``[image, text]``, project (text only unless ``context_pre_only``)."""
        batch, heads, _, head_dim = out.shape
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        image = out[:, : hidden_states.shape[1]]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        text = out[:, hidden_states.shape[1] :]
        return image, (text if attn.context_pre_only else attn.to_add_out(text))

    def token_cell(self, vae_scale_factor: int = 8) -> int:
        """``PatchEmbed`` cuts the ``height // vae_scale_factor`` latent into ``config.patch_size`` squares."""
        return vae_scale_factor * self.model.config.patch_size


class FluxAdapter(DiTAdapter):
    family = "flux"
    model_classes = ("diffusers.models.transformers.transformer_flux:FluxTransformer2DModel",)
    joint_layout = "text_first"
    block_lists = ("transformer_blocks", "single_transformer_blocks")

    def token_order(self, module: nn.Module) -> tuple[str, ...]:
        return ("text", "image")

    def joint_qkv(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None):
        """``FluxAttnProcessor``: (fused) projections, q/k norms, ``[text, image]``, RoPE over the joint sequence."""
        from diffusers.models.embeddings import apply_rotary_emb

        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            if attn.fused_projections:
                text = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                text = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                        attn.add_v_proj(encoder_hidden_states))
            text_q, text_k, text_v = (x.unflatten(-1, (-1, attn.head_dim)) for x in text)
            text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((text_q, query), (text_k, key), (text_v, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    def joint_output(self, attn, out, hidden_states, encoder_hidden_states=None):
        """Merge heads; dual-stream blocks split ``[text, image]`` and project both streams."""
        out = out.transpose(1, 2).flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())

    def token_cell(self, vae_scale_factor: int = 8) -> int:
        """``FluxPipeline._pack_latents`` packs 2x2 latent patches into one token (``config.patch_size`` is 1)."""
        return vae_scale_factor * 2


DIT_ADAPTERS = (SD3Adapter, FluxAdapter)
