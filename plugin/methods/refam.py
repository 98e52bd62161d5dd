"""RefAM: attention magnets for zero-shot referring segmentation (Kukleva, Simsar et al., arXiv 2509.22650).

*RefAM: Attention Magnets for Zero-Shot Referral Segmentation*; official code ``Annusha/refam`` (not public when
this was written: the steps follow the authors' project page, spec ``refam.md`` §1, labels [V]/[I]/[D] there).
``h = nograd.apply(flux_or_sd3_pipe, "refam")``, then ``h.ground(image, "the man in the red jacket")``:
1. the image is resized (long side ``resolution``, multiples of the token size), VAE-encoded
   (``(mean - shift) * scale``) and noised on the rectified-flow path ``z = (1 - sigma) z0 + sigma eps`` with a
   seeded generator; ONE transformer forward at timestep sigma (spec §1.3 [D]: sigma = 0.5, one sample);
2. the prompt is the expression followed by the attention magnets ``. with a the pink`` (authors' teaser figure),
   each its own ``</s>``-terminated T5 segment (§1.4); by default the expression's T5 embeddings are exactly those
   the pipeline computes for the bare expression and each magnet is encoded alone (``segments_separate``);
3. in each selected block, the image->text attention: image queries over the valid text tokens V only (expression +
   magnets + their ``</s>``; padding and, on SD3, the 77 CLIP tokens are outside V), softmax over V per head
   (``text_softmax``, no (N+T)^2 matrix: an N x |V| product) or the model's own joint softmax restricted to V
   (``joint``: exp(s - LSE) with the row LSE over every key, computed in query chunks), then the head mean (§1.5);
4. global attention sinks per block (§1.7; our rule, ``refam_tokens.detect_sinks``): received mass >= gamma x the
   median and a near-uniform image map (coefficient of variation <= kappa); they are dropped from that block's sum
   (``suppress``; ``redirect`` = the magnets plus that safety net) or removed before the softmax (``suppress_pre``);
5. stop words, magnets and special tokens are filtered *after* the softmax (§1.6), the kept token maps summed, the
   blocks averaged, the map blurred (sigma = 1 token), upsampled to the image, multiplied by the spatial ramps of
   left/right/top/bottom/middle in the expression (§1.9 SB), min-max normalised; the argmax is the point;
6. the mask: SAM from the point when ``sam=(SamModel, SamProcessor)`` is given (highest predicted IoU of the
   multimask outputs), else a training-free mask of the unblurred, unbiased upsampled map (Otsu threshold, the
   8-connected component holding the point, holes filled).
``h.stats``: the blocks read, grounds and transformer forwards run, sinks found per block, and the last call's grid,
kept/valid token counts and sinks. The processors are wrapped only inside each capture, so between calls (and after
``remove()``) the pipeline is exactly the stock one.
Ours, not the paper's: sigma, the blocks (FLUX: double-stream blocks from 9/19 of the depth plus every single-stream
block; SD3: the second half), the GAS rule, the NP heuristic, the ramps, the training-free mask, the SD3 token set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import PIL.Image
import torch
from torch import nn

from .. import kernels
from ..attention import AttentionCall, Intervention
from ..config import MethodConfig, is_int, is_number, option
from ..forward_inputs import execution_device
from ..registry import register
from . import refam_mask as rm
from .base import Method
from .refam_tokens import MAGNETS, TextToken, classify, detect_sinks, kept_mask, spatial_cues

MAGNET_MODES = ("segments_separate", "segments_joint", "string")
NORMALISATIONS = ("text_softmax", "joint")
CAPTURES = ("fast", "eager")
GAS_MODES = ("redirect", "suppress", "suppress_pre", "none")
MAX_SEQUENCE_LENGTH = 512  # T5 encoders and diffusers' FLUX / SD3 pipelines cap the text length here
SAM_ALLOWED = "None, a callable (image, points, labels) -> masks, or a pair (SamModel, SamProcessor)"


def is_segmenter(sam) -> bool:
    """``sam`` is a callable ``(image, points, labels) -> masks`` or a pair (SAM-like ``nn.Module``, processor)."""
    if isinstance(sam, (tuple, list)):
        return len(sam) == 2 and isinstance(sam[0], nn.Module) and callable(sam[1])
    return callable(sam)


@dataclass(frozen=True)
class RefAMConfig(MethodConfig):
    layers: object = option("paper", "blocks read (indices into the transformer's blocks, FLUX single-stream blocks "
                                     "after the double-stream ones): 'paper' = FLUX double blocks from 9/19 of the "
                                     "depth + every single block, SD3 the second half (spec §1.5 [D])")
    sigma: float = option(0.5, "rectified-flow noise level of the one forward pass (spec §1.3 [D]; ConceptAttention's "
                               "encode_image uses 0.5)")
    num_samples: int = option(1, "noise samples averaged (seeds seed..seed+K-1)")
    seed: int = option(0, "seed of the noise generator (an int in [0, 2**63))")
    guidance: float = option(3.5, "FLUX-dev guidance embedding (ignored by models without one)")
    resolution: int = option(1024, "long side of the resized image in pixels (rounded to the token size)")
    magnets: tuple = option(MAGNETS, "attention magnets appended to the expression (authors' teaser figure)")
    magnet_mode: str = option("segments_separate", "each magnet a </s>-terminated segment encoded alone "
                                                   "('segments_separate'), in one T5 pass ('segments_joint'), or "
                                                   "appended to the string ('string')", choices=MAGNET_MODES)
    max_sequence_length: object = option(None, "T5 length incl. padding, 1..512; None = the pipeline default "
                                               "(FLUX 512, SD3 256)")
    normalisation: str = option("text_softmax", "softmax over the valid text tokens per image patch, or the model's "
                                                "joint softmax ('joint', via the row LSE)", choices=NORMALISATIONS)
    capture: str = option("fast", "'fast' (image->text block only) or 'eager' (full (N+T)^2 softmax, the reference; "
                                  "tests and benchmarks only)", choices=CAPTURES)
    gas_mode: str = option("redirect", "global attention sinks: 'redirect' (magnets + suppress), 'suppress' (drop "
                                       "from the block's sum), 'suppress_pre' (drop before the softmax), 'none'",
                           choices=GAS_MODES)
    gas_gamma: float = option(3.0, "sink rule: received mass >= gamma x the median over V")
    gas_kappa: float = option(0.5, "sink rule: coefficient of variation of the image map <= kappa")
    noun_phrase: bool = option(False, "sum only the head noun phrase's tokens (spec §1.9 NP; off for images)",
                               choices=(True, False))
    spatial_bias: bool = option(True, "multiply by coordinate ramps for left/right/top/bottom/middle (spec §1.9 SB)",
                                choices=(True, False))
    spatial_beta: float = option(1.0, "exponent of the spatial ramps")
    smooth_sigma: float = option(1.0, "Gaussian blur of the token map, in tokens (0 = none)")
    threshold: object = option("otsu", "training-free mask threshold: 'otsu', 'mean' or a fraction in (0, 1) of the "
                                       "heatmap's range")
    sam: object = option(None, "(SamModel, SamProcessor) or a callable (image, points, labels) -> masks; None: the "
                               "training-free mask")
    lse_chunk: int = option(256, "image queries per chunk of the row LSE in 'joint' mode")

    def validate(self) -> None:
        if not (self.layers == "paper" or isinstance(self.layers, (list, tuple, range)) and len(self.layers) > 0
                and all(is_int(v) for v in self.layers)):
            self.invalid("layers", "'paper' or a non-empty list of block indices", TypeError)
        if not (is_number(self.sigma) and 0 < self.sigma <= 1):
            self.invalid("sigma", "a number in (0, 1]")
        for name in ("num_samples", "resolution", "lse_chunk"):
            value = getattr(self, name)
            if not (is_int(value) and value >= 1):
                self.invalid(name, "an int >= 1")
        if not is_int(self.seed):
            self.invalid("seed", "an int in [0, 2**63)", TypeError)
        if not 0 <= self.seed < 2**63:
            self.invalid("seed", "an int in [0, 2**63)")
        if not is_number(self.guidance):
            self.invalid("guidance", "a finite number")
        if not (isinstance(self.magnets, (list, tuple)) and all(isinstance(m, str) and m.strip() for m in self.magnets)):
            self.invalid("magnets", "a list of non-empty strings (may be empty)", TypeError)
        length = self.max_sequence_length
        if length is not None and not is_int(length):
            self.invalid("max_sequence_length", f"None or an int in 1..{MAX_SEQUENCE_LENGTH}", TypeError)
        if length is not None and not 1 <= length <= MAX_SEQUENCE_LENGTH:
            self.invalid("max_sequence_length", f"None or an int in 1..{MAX_SEQUENCE_LENGTH}")
        for name in ("gas_gamma", "spatial_beta"):
            if not (is_number(getattr(self, name)) and getattr(self, name) > 0):
                self.invalid(name, "a number > 0")
        for name in ("gas_kappa", "smooth_sigma"):
            if not (is_number(getattr(self, name)) and getattr(self, name) >= 0):
                self.invalid(name, "a number >= 0")
        if not (self.threshold in rm.THRESHOLDS or is_number(self.threshold) and 0 < self.threshold < 1):
            self.invalid("threshold", "'otsu', 'mean' or a fraction in (0, 1)")
        if self.gas_mode == "suppress_pre" and self.normalisation != "text_softmax":
            self.invalid("gas_mode", "'suppress_pre' only with normalisation='text_softmax'")
        if self.sam is not None and not is_segmenter(self.sam):
            self.invalid("sam", SAM_ALLOWED, TypeError)


# ---- the capture --------------------------------------------------------------------------------------------------
def block_probabilities(q, k, text: slice, image: slice, valid: slice, *, scale: float, key_bias=None,
                        normalisation="text_softmax", capture="fast", lse_chunk=256):
    """Per-head probabilities of one joint-attention call: image queries over V (B, H, N, |V|) and valid text
    queries over V (B, H, |V|, |V|), fp32. ``valid`` is V's span inside the text span.

    ``fast``/``text_softmax``: ``softmax_V(s q_i.k_t)`` from the N x |V| logits (``kernels.attention_rows``);
    ``fast``/``joint``: ``exp(s q_i.k_t - LSE_i)`` with the LSE over every key in chunks of ``lse_chunk`` queries
    (``kernels.row_logsumexp``, ``kernels.attention_block``); ``eager``: the full softmax over all S keys, sliced
    (and renormalised over V for ``text_softmax``): the reference, (B, H, S, S) in memory.
    """
    V = slice(text.start + valid.start, text.start + valid.stop)
    if capture == "eager":
        probs = kernels.scaled_logits(q, k, key_bias=key_bias, scale=scale).softmax(dim=-1)
        p_img, p_txt = probs[:, :, image, V], probs[:, :, V, V]
        if normalisation == "text_softmax":
            p_img, p_txt = p_img / p_img.sum(-1, keepdim=True), p_txt / p_txt.sum(-1, keepdim=True)
        return p_img, p_txt
    k_v = k[:, :, V]
    if normalisation == "text_softmax":
        bias_v = None if key_bias is None else key_bias[..., V]
        return (kernels.attention_rows(q[:, :, image], k_v, key_bias=bias_v, scale=scale),
                kernels.attention_rows(q[:, :, V], k_v, key_bias=bias_v, scale=scale))

    def joint(rows):
        lse = torch.cat([kernels.row_logsumexp(rows[:, :, i:i + lse_chunk], k, key_bias=key_bias, scale=scale)
                         for i in range(0, rows.shape[2], lse_chunk)], dim=2)
        return kernels.attention_block(rows, k, lse, keys=V, key_bias=key_bias, scale=scale)

    return joint(q[:, :, image]), joint(q[:, :, V])


@dataclass
class BlockRecord:
    """What one block's capture keeps: head-mean maps and the sink diagnostics (batch first)."""

    probs: torch.Tensor
    """(B, N, |V|) head-mean probabilities of the image queries over V, after ``suppress_pre`` if chosen."""
    sinks: torch.Tensor
    """(B, |V|) bool: detected global attention sinks."""
    received: torch.Tensor
    """(B, |V|) received mass r(t)."""


class CaptureState:
    """The recording state shared by one handle's block captures: on only inside ``capture``."""

    def __init__(self):
        self.active = False
        self.valid: slice = slice(0, 0)
        self.records: dict[int, BlockRecord] = {}
        self.grid: int | None = None


class BlockCapture(Intervention):
    """Read-out on one block's joint attention: nothing changes the call (observe only)."""

    observes = True

    def __init__(self, block: int, state: CaptureState, config: RefAMConfig):
        self.block, self.state, self.config = block, state, config

    def observe(self, call: AttentionCall) -> None:
        state, config = self.state, self.config
        if not state.active:
            return
        spans = call.extras["spans"]
        if state.grid is not None and spans["image"].stop - spans["image"].start != state.grid:
            raise RuntimeError(f"refam: block {self.block} has {spans['image'].stop - spans['image'].start} image "
                               f"tokens, the grid has {state.grid}")
        p_img, p_txt = block_probabilities(call.query, call.key, spans["text"], spans["image"], state.valid,
                                           scale=call.scaling, key_bias=call.key_bias,
                                           normalisation=config.normalisation, capture=config.capture,
                                           lse_chunk=config.lse_chunk)
        sinks, received = detect_sinks(p_img.mean(1), p_txt.mean(1), config.gas_gamma, config.gas_kappa)
        if config.gas_mode == "suppress_pre" and bool(sinks.any()):
            kept = (~sinks)[:, None, None, :]
            p_img = p_img * kept / (p_img * kept).sum(-1, keepdim=True)
        state.records[self.block] = BlockRecord(p_img.mean(1), sinks, received)


# ---- outputs ------------------------------------------------------------------------------------------------------
@dataclass
class RefAMResult:
    """What ``handle.ground`` returns. Pixel maps are (H, W) of the input image."""

    heatmap: torch.Tensor
    """float32 (H, W) in [0, 1]."""
    point: tuple[int, int]
    """(x, y) pixel of the heatmap's argmax."""
    mask: torch.Tensor
    """bool (H, W): SAM's mask from the point when a segmenter was given, else the training-free mask."""
    grid: torch.Tensor
    """(rows, cols) the aggregated token map before smoothing and the spatial bias."""
    tokens: list[TextToken]
    """Every valid text token (V), in order, with its role."""
    gas_tokens: dict[int, list[str]]
    """block -> pieces of the detected global attention sinks."""
    token_grids: torch.Tensor
    """(rows, cols, |V|) every token's map (head, block and sample mean) on the token grid."""
    image: object = None
    sam_score: float | None = None
    layer_maps: dict[int, torch.Tensor] = field(default_factory=dict)
    """block -> (rows, cols) that block's summed kept map (with ``return_layers=True``)."""
    noun_phrase: bool = False
    """Whether only the head noun phrase's content words were summed (the ``noun_phrase`` option)."""

    @property
    def kept_tokens(self) -> list[str]:
        """The pieces whose maps were summed (with ``noun_phrase``, only the head noun phrase's content words)."""
        return [t.piece for t, kept in zip(self.tokens, self._summed()) if kept]

    @property
    def filtered_tokens(self) -> list[str]:
        return [t.piece for t, kept in zip(self.tokens, self._summed()) if not kept]

    def _summed(self) -> list[bool]:
        return kept_mask(self.tokens, self.noun_phrase).tolist()

    def token_map(self, word: str) -> torch.Tensor:
        """(H, W) the sum of the sub-token maps of ``word`` (an expression word or a magnet), upsampled."""
        index = [t.index for t in self.tokens if t.word == word]
        if not index:
            raise KeyError(f"{word!r} is not a word of the prompt; words: {sorted({t.word for t in self.tokens if t.word})}")
        return rm.to_pixels(self.token_grids[..., index].sum(-1), *self.heatmap.shape)

    def overlay(self, alpha: float = 0.5):
        """The input image with the heatmap, the mask outline and the point drawn (PIL)."""
        return rm.overlay(self.image, self.heatmap, self.mask, self.point, alpha)


# ---- the method ---------------------------------------------------------------------------------------------------
@register
class RefAM(Method):
    name = "refam"
    summary = "zero-shot referring segmentation from a DiT's image->text attention with attention magnets"
    paper = "RefAM: Attention Magnets for Zero-Shot Referral Segmentation"
    arxiv = "2509.22650"
    kinds = ("dit",)
    families = ("flux", "sd3")
    Config = RefAMConfig

    # ---- blocks -------------------------------------------------------------------------------------------------
    def blocks(self) -> list[int]:
        if self.config.layers != "paper":
            return sorted(set(self.config.layers))
        model = self.adapter.model
        if self.adapter.family == "flux":
            double, single = len(model.transformer_blocks), len(model.single_transformer_blocks)
            return list(range(round(double * 9 / 19), double)) + list(range(double, double + single))
        depth = len(self.adapter.decoder_layers)
        return list(range(depth // 2, depth))

    def check_model(self) -> None:
        if self.adapter.family not in self.families:
            from ..errors import UnsupportedModelError

            raise UnsupportedModelError(f"refam supports {', '.join(self.families)}; "
                                        f"{type(self.adapter.model).__name__} is {self.adapter.family}")
        depth = len(self.adapter.decoder_layers)
        if any(not 0 <= b < depth for b in self.blocks()):
            self.config.invalid("layers", f"block indices in 0..{depth - 1}")

    def attach(self, handle) -> None:
        self.handle, self.model, self.pipe = handle, handle.model, handle.target
        self.state = CaptureState()
        handle.stats.update(blocks=self.blocks(), grounds=0, forwards=0, gas={}, normalisation=self.config.normalisation,
                            capture=self.config.capture)
        handle.expose("ground", self.ground)
        handle.expose("sweep", self.sweep)
        handle.expose("capture", self.capture)
        handle.expose("encode_text", self.encode_text)
        handle.expose("prepare", self.prepare)

    # ---- capture ------------------------------------------------------------------------------------------------
    def capture(self, inputs: dict, valid: slice, blocks=None, grid: int | None = None):
        """Run the transformer once on ``inputs`` (its forward kwargs) while recording ``blocks`` (default: the
        configured ones); ``valid`` is V's span inside the text tokens. Returns (the transformer's output,
        {block: BlockRecord}). The blocks' processors are wrapped only during this call; the output is the stock
        one (the capture only observes)."""
        from ..dit_attention import DiTAttentionPatch
        from ..guidance import suspended

        blocks = self.blocks() if blocks is None else sorted(set(blocks))
        layers = self.adapter.decoder_layers
        captures = {layers[b].attn: BlockCapture(b, self.state, self.config) for b in blocks}
        patch = DiTAttentionPatch.acquire(self.model, self.adapter)
        for module, capture in captures.items():
            patch.add(module, capture)
        self.state.valid, self.state.records, self.state.grid, self.state.active = valid, {}, grid, True
        try:
            with torch.no_grad(), suspended():  # a guidance method on the same model neither perturbs nor folds it
                out = self.model(**inputs)
        finally:
            self.state.active = False
            for module, capture in captures.items():
                patch.discard(module, capture)
        records, self.state.records = self.state.records, {}
        missing = set(blocks) - set(records)
        if missing:
            raise RuntimeError(f"refam: blocks {sorted(missing)} did not run a joint attention call")
        self.handle.stats["forwards"] += 1
        return out, records

    # ---- inputs -------------------------------------------------------------------------------------------------
    def _require_pipeline(self):
        pipe = self.pipe
        needed = ("vae", "image_processor") + (("text_encoder_2", "tokenizer_2") if self.adapter.family == "flux"
                                               else ("text_encoder_3", "tokenizer_3"))
        missing = [n for n in needed if getattr(pipe, n, None) is None]
        if pipe is self.model or missing:
            raise ValueError("refam.ground needs the diffusers pipeline (VAE, image processor and T5 encoder): "
                             "nograd.apply(pipe, 'refam')" + (f"; missing: {', '.join(missing)}" if missing else "")
                             + "; on a bare transformer use handle.capture(inputs, valid)")
        return pipe

    def encode_text(self, text: str):
        """(encoder_hidden_states (1, T, D), pooled (1, P), tokens (V), valid span inside the text tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"refam grounds one referring expression (a str) at a time; got {type(text).__name__}")
        pipe, flux = self._require_pipeline(), self.adapter.family == "flux"
        tokenizer, encoder = (pipe.tokenizer_2, pipe.text_encoder_2) if flux else (pipe.tokenizer_3, pipe.text_encoder_3)
        length = self.config.max_sequence_length or (512 if flux else 256)
        device, dtype = execution_device(self.model), self.model.dtype
        mode = self.config.magnet_mode
        magnets = list(self.config.magnets)
        segments = [(text + "".join(" " + m for m in magnets) if mode == "string" else text, False)]
        if mode != "string":
            segments += [(m, True) for m in magnets]
        ids, tokens, words = [], [], 0
        for seg_text, is_magnet in segments:
            enc = tokenizer(seg_text, add_special_tokens=True, return_offsets_mapping=True)
            seg_ids = list(enc["input_ids"])
            special = [i in tokenizer.all_special_ids for i in seg_ids]
            found = classify(tokenizer.convert_ids_to_tokens(seg_ids), enc["offset_mapping"], special, seg_text,
                             is_magnet, start=len(ids), first_word=words)
            if mode == "string":
                count = len(text.split())
                found = [TextToken(t.index, t.piece, t.word, -1, "magnet") if t.word_index >= count else t
                         for t in found]
            words += len(seg_text.split()) if not is_magnet else 0
            ids += seg_ids
            tokens += found
        if len(ids) > length:
            longer = (f"; max_sequence_length={len(ids)} (up to {MAX_SEQUENCE_LENGTH}) takes them"
                      if len(ids) <= MAX_SEQUENCE_LENGTH else "; shorten the expression")
            raise ValueError(f"refam: the expression and magnets take {len(ids)} T5 tokens, more than "
                             f"max_sequence_length={length}{longer}")
        pad = tokenizer.pad_token_id

        def run(seq):
            with torch.no_grad():
                return encoder(torch.tensor([seq], device=encoder.device), output_hidden_states=False)[0][0]

        if mode == "segments_separate":
            first = len(tokenizer(text, add_special_tokens=True)["input_ids"])
            bare = run(ids[:first] + [pad] * (length - first))  # the pipeline's own encoding of the expression
            parts, at = [bare[:first]], first
            for seg_text, _ in segments[1:]:
                n = len(tokenizer(seg_text, add_special_tokens=True)["input_ids"])
                parts.append(run(ids[at:at + n]))
                at += n
            parts.append(bare[first:first + length - len(ids)])
            t5 = torch.cat(parts)
        else:
            t5 = run(ids + [pad] * (length - len(ids)))
        t5 = t5[None].to(device, dtype)
        if flux:
            pooled = pipe._get_clip_prompt_embeds(prompt=text, device=device, num_images_per_prompt=1)
            return t5, pooled.to(dtype), tokens, slice(0, len(ids))
        e1, p1 = pipe._get_clip_prompt_embeds(prompt=text, device=device, num_images_per_prompt=1, clip_model_index=0)
        e2, p2 = pipe._get_clip_prompt_embeds(prompt=text, device=device, num_images_per_prompt=1, clip_model_index=1)
        clip = torch.cat([e1, e2], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        states = torch.cat([clip.to(dtype), t5], dim=1)
        return states, torch.cat([p1, p2], dim=-1).to(dtype), tokens, slice(clip.shape[1], clip.shape[1] + len(ids))

    def encode_image(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """z0 (1, C, h, w): the VAE latent of ``image`` resized to ``resolution``, and the token grid (rows, cols)."""
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(f"refam grounds in one PIL image at a time; got {type(image).__name__} (a list: call "
                            "ground once per image; a tensor: convert it with PIL.Image.fromarray)")
        pipe = self._require_pipeline()
        cell = self.adapter.token_cell(pipe.vae_scale_factor)
        width, height = image.size
        scale = self.config.resolution / max(width, height)
        w, h = (max(cell, round(side * scale / cell) * cell) for side in (width, height))
        pixels = pipe.image_processor.preprocess(image.convert("RGB"), height=h, width=w)
        vae = pipe.vae
        with torch.no_grad():
            z0 = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z0 = (z0 - shift) * vae.config.scaling_factor
        return z0, (h // cell, w // cell)

    def transformer_inputs(self, z0, states, pooled, sigma: float, seed: int) -> dict:
        """The one forward's kwargs: ``z = (1 - sigma) z0 + sigma eps``, eps from ``torch.Generator().manual_seed``."""
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        z = ((1 - sigma) * z0.float() + sigma * noise.to(z0.device)).to(self.model.dtype)
        device = execution_device(self.model)
        if self.adapter.family == "sd3":
            return dict(hidden_states=z, timestep=torch.tensor([sigma * 1000.0], device=device),
                        encoder_hidden_states=states, pooled_projections=pooled, return_dict=False)
        b, c, h, w = z.shape
        inputs = dict(hidden_states=self.pipe._pack_latents(z, b, c, h, w),
                      timestep=torch.tensor([sigma], device=device, dtype=z.dtype),
                      pooled_projections=pooled, encoder_hidden_states=states,
                      txt_ids=torch.zeros(states.shape[1], 3, device=device, dtype=z.dtype),
                      img_ids=self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, z.dtype),
                      return_dict=False)
        if self.model.config.guidance_embeds:
            inputs["guidance"] = torch.full([1], float(self.config.guidance), device=device, dtype=torch.float32)
        return inputs

    def prepare(self, image, text: str, sigma: float | None = None, sample: int = 0):
        """(transformer kwargs, V's span in the text tokens, grid (rows, cols), tokens) of one ``ground`` forward."""
        z0, grid = self.encode_image(image)
        states, pooled, tokens, valid = self.encode_text(text)
        sigma = self.config.sigma if sigma is None else sigma
        return self.transformer_inputs(z0, states, pooled, sigma, self.config.seed + sample), valid, grid, tokens

    # ---- aggregation --------------------------------------------------------------------------------------------
    def _maps(self, image, text: str, sigma: float, blocks: list[int]):
        """Per block, the sample-mean summed kept map (N,) and token maps (N, |V|); tokens; sinks per block."""
        z0, grid = self.encode_image(image)
        states, pooled, tokens, valid = self.encode_text(text)
        kept = kept_mask(tokens, self.config.noun_phrase)
        if not bool(kept.any()):
            raise ValueError(f"refam: the expression {text!r} has no content word to ground (only stop words, "
                             "punctuation or nothing); name the object, e.g. 'the red cup'")
        suppress = self.config.gas_mode in ("redirect", "suppress")
        heat: dict[int, torch.Tensor] = {}
        probs: dict[int, torch.Tensor] = {}
        gas: dict[int, set] = {b: set() for b in blocks}
        samples = self.config.num_samples
        for sample in range(samples):
            inputs = self.transformer_inputs(z0, states, pooled, sigma, self.config.seed + sample)
            _, records = self.capture(inputs, valid, blocks, grid=grid[0] * grid[1])
            for b, record in records.items():
                p, sinks = record.probs[0].float(), record.sinks[0].cpu()
                use = kept & ~sinks if suppress else kept
                heat[b] = heat.get(b, 0) + p[:, use.to(p.device)].sum(-1) / samples
                probs[b] = probs.get(b, 0) + p / samples
                gas[b] |= set(sinks.nonzero().flatten().tolist())
                self.handle.stats["gas"][b] = self.handle.stats["gas"].get(b, 0) + int(sinks.sum())
        gas_tokens = {b: [tokens[i].piece for i in sorted(found)] for b, found in gas.items()}
        return heat, probs, tokens, gas_tokens, grid

    def _finish(self, image, text, heat: torch.Tensor, grid):
        """(heatmap (H, W) in [0, 1], point) from the aggregated (N,) token map: blurred, upsampled, biased."""
        width, height = image.size
        smoothed = rm.smooth(heat.view(grid).cpu(), self.config.smooth_sigma)
        pixels = rm.to_pixels(smoothed, height, width)
        cues = spatial_cues(text) if self.config.spatial_bias else []
        if cues:  # ours: the ramp scales the map above its floor (spec §1.9 [D] scales the map itself, whose
            # background mass the ramp would turn into a peak at the image's edge)
            pixels = (pixels - pixels.min()) * rm.spatial_ramp(cues, height, width, self.config.spatial_beta)
        heatmap = rm.normalise(pixels)
        return heatmap, rm.argmax_point(heatmap)

    def ground(self, image, text: str, sam=None, return_layers: bool = False) -> RefAMResult:
        """Ground ``text`` in ``image`` (PIL): heatmap, point and mask in the image's pixel space (module docstring).
        ``sam`` overrides the configured segmenter for this call."""
        if sam is not None and not is_segmenter(sam):
            raise TypeError(f"refam: ground(sam={sam!r}) is not allowed; expected {SAM_ALLOWED}")
        blocks = self.blocks()
        heat, probs, tokens, gas_tokens, grid = self._maps(image, text, self.config.sigma, blocks)
        total = sum(heat[b] for b in blocks) / len(blocks)
        heatmap, point = self._finish(image, text, total, grid)
        sam = self.config.sam if sam is None else sam
        score = None
        if sam is not None:
            mask, score = rm.sam_mask(sam, image.convert("RGB"), point)
            if tuple(mask.shape) != tuple(heatmap.shape):
                raise RuntimeError(f"refam: the segmenter returned a {tuple(mask.shape)} mask for a "
                                   f"{tuple(heatmap.shape)} image")
        else:
            # the blur and the ramps pick the point; the mask thresholds the plain upsampled map (sharper edges)
            plain = rm.normalise(rm.to_pixels(total.view(grid).cpu(), *heatmap.shape))
            mask = rm.heatmap_mask(plain, point, self.config.threshold)
        token_grids = (sum(probs[b] for b in blocks) / len(blocks)).cpu().view(*grid, -1)
        layer_maps = {b: heat[b].cpu().view(grid) for b in blocks} if return_layers else {}
        self.handle.stats["grounds"] += 1
        result = RefAMResult(heatmap=heatmap, point=point, mask=mask, grid=total.cpu().view(grid), tokens=tokens,
                             gas_tokens=gas_tokens, token_grids=token_grids, image=image, sam_score=score,
                             layer_maps=layer_maps, noun_phrase=self.config.noun_phrase)
        self.handle.stats["last"] = dict(grid=grid, kept=len(result.kept_tokens), valid=len(tokens),
                                         sinks={b: g for b, g in gas_tokens.items() if g})
        return result

    def sweep(self, dataset, blocks=None, sigmas=None, limit: int | None = None) -> dict:
        """Point accuracy (the authors' SAM-free PA: the argmax inside the ground-truth mask) of every (sigma, block
        set) on ``dataset`` (items with ``.image``, ``.expression``, ``.mask``; e.g. ``nograd.data.refcoco``).

        ``blocks``: a list of candidates, each a block index or a list of them (default: the configured set);
        ``sigmas``: noise levels (default: the configured one). One forward per (sample, sigma) records every block
        any candidate needs. Returns {"accuracy": {(sigma, blocks tuple): PA}, "count": n, "best": key}.
        """
        candidates = [tuple(self.blocks())] if blocks is None else [
            (c,) if isinstance(c, int) else tuple(sorted(set(c))) for c in blocks]
        depth = len(self.adapter.decoder_layers)
        if not candidates or any(not c or any(not 0 <= b < depth for b in c) for c in candidates):
            raise ValueError(f"refam.sweep: blocks must be block indices (or lists of them) in 0..{depth - 1}")
        sigmas = [self.config.sigma] if sigmas is None else list(sigmas)
        if not sigmas or any(not (is_number(s) and 0 < s <= 1) for s in sigmas):
            raise ValueError("refam.sweep: sigmas must be numbers in (0, 1]")
        union = sorted({b for c in candidates for b in c})
        hits = {(s, c): 0 for s in sigmas for c in candidates}
        count = 0
        for index, sample in enumerate(dataset):
            if limit is not None and index >= limit:
                break
            image, mask = sample.image, torch.as_tensor(sample.mask).bool()
            for sigma in sigmas:
                heat, _, _, _, grid = self._maps(image, sample.expression, sigma, union)
                for c in candidates:
                    _, (x, y) = self._finish(image, sample.expression, sum(heat[b] for b in c) / len(c), grid)
                    hits[(sigma, c)] += bool(mask[y, x])
            count += 1
        accuracy = {key: (value / count if count else math.nan) for key, value in hits.items()}
        best = max(accuracy, key=lambda key: accuracy[key]) if count else None
        self.handle.stats["sweep"] = dict(count=count, best=best)
        return {"accuracy": accuracy, "count": count, "best": best}
