"""PAINT: fixing imbalanced attention to mitigate in-context hallucination of LVLMs (arXiv 2501.12206).

Arif et al., *Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language Model*
(later renamed PAINT); official code ``hasanar1f/PAINT`` (spec ``paint.md`` §1):
1. Token selection from the vision tower, once per image, in the same forward pass (a read-out of the tower's own
   attention, no second pass): *local* tokens are the top ``floor(N * local_ratio)`` patches by the CLS->patch
   attention of the first encoder layer summed over heads; *summary* tokens are the upper Tukey outliers
   (``Q3 + 1.5 IQR``, linear quartiles) of the CLS->patch attention at the feature layer the projector reads;
   local tokens that are also summary tokens are dropped from the local set (``update_modpai_alpha``,
   ``get_top_ratio``).
2. In decoder layers ``[2, L)``, every head, the rows from the prompt's last token on: ``s + alpha * |s|`` on local
   keys and ``s + beta * |s|`` on summary keys (PAI's edit with two margins; official alpha 0.7, beta 0.4 - the
   paper setting, the code default is 0.3).
Every published PAINT result also uses PAI's image-free logits refine: ``cfg_gamma=1.1``.
The head-specific modulation of the paper's v1 abstract is absent from the released code, so ``heads="uniform"``
(the official behaviour) is the default; the other modes are the spec's reconstruction (§1.4): gains from each
head's measured visual share (the image's share of the prompt's last row, without the edit), on calibration data
(``head_stats``) or on the current input. Qwen2-VL's tower has no CLS token: its local and summary scores are the
attention each patch receives (mean over queries and heads) in the first and last blocks, summed over the patches
the merger joins into one token (spec §5.6, our reconstruction); Idefics3 / SmolVLM likewise, per tile, summed over
the ``scale_factor^2`` patches the connector's ``pixel_shuffle`` folds into one token. The spatial stream
(``spatial_ratio``, off in the official code) uses the attention each patch receives in the first vision layer: the
official row sums are constant (spec §1.7). Qwen2.5-VL reads its full-attention blocks and undoes its window
permutation. How the patch scores reach the LLM's tokens is the adapter's (``patch_scores_to_tokens``, the
projector's own geometry; a token's score is the sum of its patches'):
- Qwen3-VL: as Qwen2-VL (received attention per image, the merger's runs of ``spatial_merge_size^2`` patches); the
  summary layer is the last block, which the merger reads (the deepstack mergers' taps are added to the decoder's
  hidden states, not the image features).
- Gemma3: SigLIP (no CLS), received attention per image, the projector's ``avg_pool`` (times its
  ``kernel_size^2``: the sum over the pooled block); the summary layer is the last (``last_hidden_state``).
- InternVL-hf: a CLS tower run on every tile: the CLS row per tile, folded by the model's ``pixel_shuffle``
  (``downsample_ratio``); an image's tiles (crops, then the thumbnail) are one run of tokens, over which the ratio
  and the Tukey rule apply; the summary layer is ``vision_feature_layer``.
- Mistral3: the Pixtral tower runs all images of a call as one sequence with a block-diagonal mask: the received
  attention is averaged over the queries that see each patch, its own image's (the mask hides the others); split
  per image by ``image_sizes`` and folded as
  ``Mistral3PatchMerger``'s ``unfold``.
Towers that pack all images in one flash call (Qwen, Pixtral) are refused with flash attention.

LLaVA-NeXT and LLaVA-OneVision ("anyres") run their tower on every tile of every image (a base tile, then the
crops): the read-out gives patch scores per tile, the CLS rows of NeXT's CLIP tower, the received attention of
OneVision's SigLIP tower (no CLS). They reach the LLM tokens through the model's own ``pack_image_features``
(``AnyResAdapter.pack``, as the adapter's layout probe): the image's (tiles, side^2, scores) go in, newline rows
come out marked and are dropped, so the scores follow the image's tokens without a re-derived layout. Newline
tokens are never selected; the ratios and the Tukey rule apply over all of an image's other tokens (spec §5.6 says
"per crop"; one image's CLS rows are on one scale, each tile's summing to at most 1). ``generate()`` pops
``image_sizes`` and the other image inputs before the prefill and encodes the images itself
(``nograd.observe``): PAINT observes the calls of ``get_image_features`` to keep what the images were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..attention import AttentionCall, Intervention, intervene
from ..config import MethodConfig, is_number, option
from ..errors import UnsupportedModelError
from ..observe import observe_calls
from ..registry import register
from .visual_edit import (CFG_GAMMA_DOC, IMAGE_INPUTS, ROWS, VisualEditMethod, VisualPrompt, check_cfg_gamma,
                          check_layers)

PACKED_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mistral3")
"""Towers that run all images in one sequence: flash attention packs them (cu_seqlens) where the read-outs need
each image's attention (Qwen's per-image calls, Pixtral's block-diagonal mask)."""
ANYRES_FAMILIES = ("llava_next", "llava_onevision")


def tukey_outliers(scores: torch.Tensor) -> torch.Tensor:
    """Indices of the upper outliers ``scores > Q3 + 1.5 (Q3 - Q1)`` (linear-interpolated quartiles, as numpy),
    highest first."""
    q1, q3 = torch.quantile(scores.double(), torch.tensor([0.25, 0.75], dtype=torch.float64, device=scores.device))
    count = int((scores.double() > q3 + 1.5 * (q3 - q1)).sum())
    return scores.topk(count).indices


def select_tokens(local_scores: torch.Tensor, summary_scores: torch.Tensor, local_ratio: float,
                  spatial_scores: torch.Tensor | None = None, spatial_ratio: float = 0.0):
    """(local, summary) patch indices of one image, disjoint: the Tukey outliers of ``summary_scores``, and the top
    ``floor(N * local_ratio)`` by ``local_scores`` joined with the top ``floor(N * spatial_ratio)`` by
    ``spatial_scores`` (the spatial stream), less the summary tokens (``Local <- (Local u Spatial) \ Summary``)."""
    summary = tukey_outliers(summary_scores)
    local = local_scores.topk(math.floor(local_scores.numel() * local_ratio)).indices
    if spatial_scores is not None and spatial_ratio > 0:
        spatial = spatial_scores.topk(math.floor(spatial_scores.numel() * spatial_ratio)).indices
        local = torch.cat([local, spatial[~torch.isin(spatial, local)]])
    local = local[~torch.isin(local, summary)]
    return local, summary


def load_head_stats(source, shape: tuple[int, int]) -> torch.Tensor:
    """The (L, H) visual shares from a table or a ``save_head_stats`` file; ``ValueError`` on a shape mismatch."""
    if isinstance(source, str):
        from safetensors.torch import load_file

        source = load_file(source)["visual_share"]
    table = torch.as_tensor(source, dtype=torch.float32)
    if tuple(table.shape) != shape:
        raise ValueError(f"paint: option head_stats has shape {tuple(table.shape)}; expected {shape} for this model")
    return table


class ClsRows(Intervention):
    """Read-out on one vision layer: the CLS query's attention over the patches, summed over heads (images, N),
    stored under each of ``keys``."""

    observes = True

    def __init__(self, store: dict, keys: list[str]):
        self.store = store
        self.keys = keys

    def observe(self, call: AttentionCall) -> None:
        rows = call.attention_rows(torch.zeros(1, dtype=torch.long))
        for key in self.keys:
            self.store[key] = rows[:, :, 0, 1:].sum(dim=1).detach()  # a selection: no graph kept past the step


HEAD_MODES = ("uniform", "proportional", "inverse", "topk")


class ReceivedAttention(Intervention):
    """Read-out of the attention each patch receives, averaged over the queries and the heads: the scores of towers
    without a CLS token (spec ``paint.md`` §5.6, our reconstruction) and of the spatial stream (the "received"
    source of §6.2: the official row sums are constant). Each call appends one (patches,) row per image of its batch
    under each of ``keys`` (Qwen2-VL's tower attends per image, one call each; an anyres tower's batch is the
    tiles); ``skip`` leading tokens (a CLS) are not patches."""

    observes = True

    def __init__(self, store: dict, keys: list[str], skip: int = 0):
        self.store = store
        self.keys = keys
        self.skip = skip

    def observe(self, call: AttentionCall) -> None:
        received = call.key_mass(reduce="mean").mean(dim=1)[:, self.skip:].detach()
        for key in self.keys:
            self.store.setdefault(key, []).extend(received)


@dataclass(frozen=True)
class PAINTConfig(MethodConfig):
    alpha: float = option(0.7, "margin on local tokens, s + alpha*|s| (official 0.7)")
    beta: float = option(0.4, "margin on summary tokens, s + beta*|s| (paper setting 0.4; code default 0.3)")
    local_ratio: float = option(0.25, "share of the patches chosen as local tokens (official 0.25)")
    spatial_ratio: float = option(0.0, "share added by the spatial stream: the patches that receive the most "
                                       "attention in the first vision layer (official code default 0, off; 0.05 best "
                                       "in the v1 ablation)")
    layers: object = option(None, "decoder layers (start, end); None = the official [2, 32) scaled to the depth")
    cfg_gamma: object = option(None, CFG_GAMMA_DOC)
    rows: str = option("prompt_end", "edited query rows: 'prompt_end' (official) or 'after_image'", choices=ROWS)
    heads: object = option("uniform", "per-head gains on the margins: 'uniform' (the released code), "
                                      "'proportional' / 'inverse' (to each head's visual share over the layer mean, "
                                      "clipped to head_gain_max), 'topk' (1 for the head_ratio most visual heads of "
                                      "a layer, else 0), or an explicit (L, H) gain table")
    head_ratio: float = option(0.5, "share of heads per layer kept by heads='topk'")
    head_gain_max: float = option(2.0, "upper clip of the 'proportional' / 'inverse' gains")
    head_stats: object = option(None, "visual shares (L, H) measured before (a table, or a file written by "
                                      "h.save_head_stats); None: each batch row's own, measured on the current "
                                      "prompt at its prefill (before that layer's edit, which they then set)")

    def validate(self) -> None:
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not is_number(value):
                self.invalid(name, "a finite number")
        for name in ("local_ratio", "spatial_ratio"):
            if not (is_number(getattr(self, name)) and 0 <= getattr(self, name) <= 1):
                self.invalid(name, "a number in [0, 1]")
        check_layers(self)
        check_cfg_gamma(self)
        if isinstance(self.heads, str):
            if self.heads not in HEAD_MODES:
                self.invalid("heads", f"one of {', '.join(map(repr, HEAD_MODES))} or an (L, H) gain table")
        else:
            try:
                object.__setattr__(self, "heads", torch.as_tensor(self.heads, dtype=torch.float32))
            except (TypeError, ValueError, RuntimeError):
                self.invalid("heads", f"one of {', '.join(map(repr, HEAD_MODES))} or an (L, H) gain table", TypeError)
            if not bool((torch.isfinite(self.heads) & (self.heads >= 0)).all()):
                self.invalid("heads", "an (L, H) gain table of finite values >= 0")
        if not (is_number(self.head_ratio) and 0 < self.head_ratio <= 1):
            self.invalid("head_ratio", "a number in (0, 1]")
        if not (is_number(self.head_gain_max) and self.head_gain_max > 0):
            self.invalid("head_gain_max", "a number > 0")
        if self.head_stats is not None and not isinstance(self.head_stats, (str, torch.Tensor, list)):
            self.invalid("head_stats", "None, a path to a safetensors file, or an (L, H) table", TypeError)
        if self.head_stats is not None and not (isinstance(self.heads, str) and self.heads in HEAD_MODES
                                                and self.heads != "uniform"):
            self.invalid("head_stats", "None unless heads is 'proportional', 'inverse' or 'topk' (the shares set "
                                       "those modes' gains; uniform and table heads read none)")


@register
class PAINT(VisualEditMethod):
    name = "paint"
    summary = "boost ViT-selected local and summary image tokens in the LLM's attention (s + margin*|s|)"
    paper = "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language Model"
    arxiv = "2501.12206"
    families = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3",
                "internvl", "mistral3", "gemma3")
    Config = PAINTConfig
    default_layers = (2 / 32, 1.0)
    edits_video = False

    def __init__(self, adapter, config):
        super().__init__(adapter, config)
        self.scores: dict[str, torch.Tensor] = {}
        self._selected: tuple[VisualPrompt, torch.Tensor] | None = None
        shape = (adapter.num_layers, adapter.num_heads)
        self.share_sum = torch.zeros(shape, dtype=torch.float64)
        self.share_count = torch.zeros(adapter.num_layers, dtype=torch.long)
        """Every measured row's shares, summed (and counted) per layer, for ``save_head_stats``."""
        self.shares: dict[int, torch.Tensor] = {}
        """Layer -> (B, H) shares of the current prompt (measured at its prefill, without ``head_stats``)."""
        if config.head_stats is not None:
            self.share_sum, self.share_count[:] = load_head_stats(config.head_stats, shape).double(), 1
        self.measures_heads = isinstance(config.heads, str) and config.heads != "uniform" and config.head_stats is None
        self.anyres = adapter.family in ANYRES_FAMILIES
        self._pending_images: dict | None = None
        """AnyRes: the image inputs of the ``get_image_features`` call whose tower run comes next."""
        self._kept: dict | None = None
        """The image scores, put aside while the tower encodes a video (Qwen-VL, OneVision) or, on AnyRes, runs
        outside ``get_image_features``."""
        self._video_run = False
        """``get_video_features`` was called: the next tower run encodes video frames, not images."""
        self._counted: set[int] = set()
        """The layers whose head counts are in the stats for the current prompt (counted once per prompt: a count
        reads the rows back from the device)."""

    def new_prompt(self, prompt: VisualPrompt | None) -> None:
        self._counted = set()
        if prompt is None:  # nothing selected for a prompt without image tokens: the stats say so
            self.stats.update(local_tokens=[], summary_tokens=[], selection=[], heads_edited={}, heads_modulated={})

    def head_gains(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """The spec's reconstruction of the v1 head modulation (paint.md §1.4), from the visual shares: (H,) from
        ``head_stats``, else (B, H) from each row's own shares on the current prompt. Per layer, each batch row's
        count (0 for a row without an image) of the heads the edit acts on (gain > 0) goes to
        ``h.stats["heads_edited"]``, and of those with a gain other than 1 to ``h.stats["heads_modulated"]``."""
        heads, num_heads = self.config.heads, self.adapter.num_heads
        if isinstance(heads, str) and heads == "uniform":
            return torch.ones(num_heads)
        if isinstance(heads, torch.Tensor):  # a gain table: its counts go to the stats as the measured gains' do
            gains = heads[layer]
        else:
            share = self.shares[layer] if self.measures_heads else (self.share_sum[layer] / self.share_count[layer])
            share = share.float()
            if heads == "topk":
                top = share.topk(max(1, round(self.config.head_ratio * num_heads)), dim=-1).indices
                gains = torch.zeros_like(share).scatter_(-1, top, 1.0)
            else:
                ratio = share / share.mean(dim=-1, keepdim=True).clamp(min=1e-12)
                ratio = ratio if heads == "proportional" else 1 / ratio.clamp(min=1e-12)
                gains = ratio.clamp(0, self.config.head_gain_max)
        if layer not in self._counted:
            self._counted.add(layer)
            for key, heads in (("heads_edited", gains > 0), ("heads_modulated", (gains > 0) & (gains != 1))):
                self.stats[key][layer] = (heads.reshape(-1, num_heads).sum(dim=-1).cpu().expand(len(rows))
                                          * rows.cpu()).tolist()
        return gains

    def record_visual_share(self, layer: int, share: torch.Tensor, rows: torch.Tensor) -> None:
        """The current prompt's shares replace the last prompt's; the rows with an image join the running sum."""
        self.shares[layer] = share
        self.share_sum[layer] += share[rows].double().sum(dim=0).cpu()
        self.share_count[layer] += int(rows.sum())

    def save_head_stats(self, path: str) -> None:
        """Write the measured visual shares (L, H) to a safetensors file, for ``head_stats=path`` later."""
        from safetensors.torch import save_file

        measured = self.share_count > 0
        shares = torch.where(measured[:, None], self.share_sum / self.share_count.clamp(min=1)[:, None], float("nan"))
        save_file({"visual_share": shares.float().contiguous()}, path,
                  metadata={"model": type(self.adapter.model).__name__, "shape": str(tuple(shares.shape))})

    def check_model(self) -> None:
        super().check_model()
        shape = (self.adapter.num_layers, self.adapter.num_heads)
        if isinstance(self.config.heads, torch.Tensor) and tuple(self.config.heads.shape) != shape:
            self.config.invalid("heads", f"an (L, H) = {shape} gain table for this model")
        family = self.adapter.family
        if family == "llava" and not self.adapter.vision_has_cls:  # (nograd.apply checked the family)
            raise UnsupportedModelError(
                f"paint needs one CLS-token vision tower per image on LLaVA-1.5 (CLIP); this "
                f"{type(self.adapter.model).__name__}'s tower has none")
        vision_config = getattr(self.adapter.model.config, self.adapter.vision_attn_config_key)
        vision_implementation = vision_config._attn_implementation
        if family in PACKED_FAMILIES and "flash" in str(vision_implementation):
            raise UnsupportedModelError(f"paint reads the vision attention of {family} per image (Qwen: a call per "
                                        "image; Mistral3: a block-diagonal mask), which its flash path packs into "
                                        "one call without a mask: load the vision tower with sdpa or eager")

    def is_neutral(self) -> bool:
        return self.config.alpha == 0 and self.config.beta == 0

    def attach(self, handle) -> None:
        self.stats = handle.stats
        handle.stats.update(local_tokens=[], summary_tokens=[], selection=[], heads_edited={}, heads_modulated={})
        handle.expose("save_head_stats", self.save_head_stats, live_only=False)
        super().attach(handle)
        if self.is_neutral():
            return  # no edit, so no token selection to read
        full = self.adapter.vision_full_attention_layers
        feature = self.adapter.vision_feature_layer
        readouts = {full[0]: ["local"]}
        readouts.setdefault(feature if feature in full else full[-1], []).append("summary")
        vision = self.adapter.vision_attention_modules
        readout = ClsRows if self.adapter.vision_has_cls else ReceivedAttention
        probes = {vision[layer]: [readout(self.scores, keys)] for layer, keys in readouts.items()}
        if self.config.spatial_ratio > 0:
            spatial = ReceivedAttention(self.scores, ["spatial"], int(self.adapter.vision_has_cls))
            probes[vision[full[0]]].append(spatial)
        for module, interventions in probes.items():
            for probe in interventions:
                intervene(handle, {module: probe})
        # generate() encodes the images before the prefill forward and drops the image inputs from it: keep what
        # the tower saw, for the image layout
        hook = self.adapter.vision_tower.register_forward_pre_hook(self._capture_images, with_kwargs=True)
        handle.on_remove("vision tower input hook", hook.remove)
        model = self.adapter.multimodal_model
        if self.anyres:
            # the tower sees only the tiles; the image sizes (which the layout needs) reach get_image_features only
            observe_calls(handle, model, "get_image_features", self._observe_image_encoding)
        if hasattr(model, "get_video_features"):  # the same tower encodes video frames: their scores are not kept
            observe_calls(handle, model, "get_video_features", self._observe_video_encoding)
        if self.anyres or hasattr(model, "get_video_features"):
            hook = self.adapter.vision_tower.register_forward_hook(self._restore_image_scores)
            handle.on_remove("vision tower output hook", hook.remove)

    def _observe_image_encoding(self, arguments: dict) -> None:
        """AnyRes: ``get_image_features`` is called (by the forward, or by ``generate()`` before the prefill): its
        image inputs describe the tower run that follows. They alone give the layout (not the forward's: OneVision's
        forward does not hand its ``vision_aspect_ratio`` on, generate does)."""
        self._pending_images = {key: arguments[key] for key in IMAGE_INPUTS if arguments.get(key) is not None}

    def _observe_video_encoding(self, arguments: dict) -> None:
        self._video_run = True

    def _restore_image_scores(self, module, args, output):
        """After a tower run that did not encode images, the image scores as they were before it."""
        if self._kept is not None:
            self.scores.clear()
            self.scores.update(self._kept)
            self._kept = None

    def _capture_images(self, module, args, kwargs):
        """A new tower run: clear the read-outs, keep its pixels (and Qwen's ``grid_thw``, Pixtral's
        ``image_sizes``); AnyRes: keep the image inputs of its ``get_image_features`` call. A run that encodes video
        frames (after ``get_video_features``), or on AnyRes a run outside ``get_image_features``, puts the image
        scores aside until it ends."""
        if self._video_run or (self.anyres and self._pending_images is None):
            self._video_run = False
            self._kept = dict(self.scores)
            self.scores.clear()
            return
        if self.anyres:
            self.scores.clear()
            self.scores["image_inputs"], self._pending_images = self._pending_images, None
            self._selected = None
            return
        self.scores.clear()
        self._selected = None  # new images: select again, even for a forward the tracker takes as a continuation
        inputs = {"pixel_values": args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))}
        grid = args[1] if len(args) > 1 else kwargs.get("grid_thw")
        if grid is not None:
            inputs["image_grid_thw"] = grid
        if kwargs.get("image_sizes") is not None:  # Mistral3's Pixtral tower: the images' sizes, for their patches
            inputs["image_sizes"] = kwargs["image_sizes"]
        self.scores["image_inputs"] = inputs

    def coefficients(self, prompt: VisualPrompt):
        if self._selected is None or self._selected[0] is not prompt:
            # the selection is discrete (its margins are constants): built without autograd, or gradient
            # checkpointing's recomputation, which finds it cached, would save fewer tensors than the forward did
            with torch.no_grad():
                self._selected = (prompt, self._margins(prompt))
        return self._selected[1], None

    def _token_scores(self, key: str, sizes: list[int]) -> list[torch.Tensor]:
        """Each image's scores per LLM token. The tower gives patch scores per run unit (a LLaVA / Qwen / Gemma3
        image, an Idefics3 or InternVL tile: CLS rows or received attention), which the adapter folds into tokens as
        its projector does (``patch_scores_to_tokens``: LLaVA one token per patch, Qwen's merger units, Idefics3's
        and InternVL's ``pixel_shuffle``, Gemma3's average pool), split per image."""
        scores = self.scores[key]
        tokens = self.adapter.patch_scores_to_tokens(list(scores), self.scores["image_inputs"])
        if len(tokens) != sum(sizes):
            raise RuntimeError(f"paint: the images have {sum(sizes)} image tokens but the tower scored {len(tokens)}")
        return list(tokens.split(sizes))

    def _anyres_token_scores(self, keys: list[str], sizes: list[int], image_sizes, **inputs):
        """AnyRes: key -> each image's scores per LLM image token, newlines left out, in the order of its tiles'
        positions (the base raster, then the crop raster row-major).

        The tower's tiles are split per image (``adapter.tiles_per_image``; OneVision leaves the images of a
        multi-image row unsplit) and each image's (tiles, side^2, scores + 1) tensor goes through the model's own
        ``pack_image_features`` (``adapter.pack``) with a newline of zeros and a last channel 1, which marks the
        newline rows; ``adapter.layout_from_probe`` reads the layout off that channel. OneVision's
        ``vision_aspect_ratio`` may shrink a large crop raster bilinearly: its tokens then get the interpolated
        patch scores, which is the analogue we take (our reconstruction) for tokens that are no single patch."""
        vision = self.adapter.model.config.vision_config
        side = vision.image_size // vision.patch_size
        image_sizes = torch.as_tensor(image_sizes).cpu()
        tiles = self.adapter.tiles_per_image(image_sizes, **inputs)
        per_tile = torch.stack([torch.stack(list(self.scores[key])).float().cpu() for key in keys], dim=-1)
        if tuple(per_tile.shape[:2]) != (sum(tiles), side * side):
            raise RuntimeError(f"paint: the vision tower scored {tuple(per_tile.shape[:2])} (tiles, patches); the "
                               f"images' sizes give {(sum(tiles), side * side)}")
        per_tile = torch.cat([per_tile, per_tile.new_zeros(*per_tile.shape[:2], 1)], dim=-1)
        newline = torch.zeros(len(keys) + 1)
        newline[-1] = 1
        scores = {key: [] for key in keys}
        for size, chunk, count in zip(image_sizes, per_tile.split(tiles), sizes):
            (packed,), _ = self.adapter.pack([chunk], size[None], newline, **inputs)
            layout = self.adapter.layout_from_probe(packed[:, -1] == 1, side)
            tokens = packed[torch.cat([tile.positions for tile in layout.tiles])]
            if len(tokens) != count:
                raise RuntimeError(f"paint: an image has {count} image tokens but its packed scores {len(tokens)}")
            for index, key in enumerate(keys):
                scores[key].append(tokens[:, index])
        return scores

    def _copies(self, prompt: VisualPrompt) -> int:
        """How many consecutive copies of each prompt the batch rows are: ``generate`` with ``num_beams`` or
        ``num_return_sequences`` k encodes the images of the B prompts, then repeats each row k times. The least k
        whose groups of k rows are identical and whose distinct rows hold as many image tokens as the encoded images
        fill (1: the rows are the prompts)."""
        if self.anyres:
            inputs = self.scores["image_inputs"]
            encoded = sum(layout.num_tokens for layout in self.adapter.image_layouts(prompt.input_ids, **inputs))
        else:
            encoded = len(self.adapter.patch_scores_to_tokens(list(self.scores["local"]), self.scores["image_inputs"]))
        rows = prompt.visual.shape[0]
        for k in (k for k in range(1, rows + 1) if rows % k == 0 and int(prompt.visual[::k].sum()) == encoded):
            if all(bool((t.view(rows // k, k, -1) == t[::k, None]).all()) for t in (prompt.input_ids, prompt.real)):
                return k
        return 1

    def _margins(self, prompt: VisualPrompt) -> torch.Tensor:
        """(B, T): alpha on each image's local tokens, beta on its summary tokens, 0 elsewhere; for rows that repeat
        their prompt (``_copies``), those of the prompt (``selection`` counts the distinct prompts' rows)."""
        copies = self._copies(prompt)
        if copies > 1:
            distinct = VisualPrompt.from_inputs(self.adapter, prompt.input_ids[::copies], prompt.real[::copies])
            distinct.image_inputs = prompt.image_inputs
            return self._prompt_margins(distinct).repeat_interleave(copies, dim=0)
        return self._prompt_margins(prompt)

    def _prompt_margins(self, prompt: VisualPrompt) -> torch.Tensor:
        """``_margins`` of rows that are each one prompt."""
        margins = torch.zeros(prompt.visual.shape, dtype=torch.float32, device=prompt.visual.device)
        image_inputs = self.scores["image_inputs"]
        if not self.anyres:
            image_inputs = {**image_inputs, **prompt.image_inputs}
        grids = self.adapter.image_grids(prompt.input_ids, **image_inputs)
        positions = [torch.cat([tile.positions for tile in grid.tiles]) for grid in grids]
        sizes = [len(p) for p in positions]
        keys = ["local", "summary"] + (["spatial"] if "spatial" in self.scores else [])
        if self.anyres:
            scores = self._anyres_token_scores(keys, sizes, **image_inputs)
        else:
            scores = {key: self._token_scores(key, sizes) for key in keys}
        spatial_scores = scores["spatial"] if "spatial" in scores else [None] * len(grids)
        selection = []
        for grid, where, local_score, summary_score, spatial_score in zip(grids, positions, scores["local"],
                                                                          scores["summary"], spatial_scores):
            local, summary = select_tokens(local_score, summary_score, self.config.local_ratio, spatial_score,
                                           self.config.spatial_ratio)
            local, summary = local.to(where.device), summary.to(where.device)
            margins[grid.batch_row, where[local]] = self.config.alpha
            margins[grid.batch_row, where[summary]] = self.config.beta
            selection.append({"batch_row": grid.batch_row, "local": where[local], "summary": where[summary]})
        self.stats.update(local_tokens=[len(s["local"]) for s in selection],
                          summary_tokens=[len(s["summary"]) for s in selection], selection=selection)
        return margins
