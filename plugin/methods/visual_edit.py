"""The shared base of the VLM score-edit methods (PAI, ClearSight; PAINT next): where the image and the prompt are,
and one ``ScoreEdit`` per decoder layer built from per-key coefficients (spec ``paint.md`` §5.1-5.5).

At every prefill (a forward on an empty KV cache) a pre-hook on the model records, per batch row, which sequence
positions hold visual tokens (``adapter.visual_token_mask``: image tokens, and video tokens where the model has them;
PAINT takes image tokens only), which are real (non-pad) tokens, where the prompt ends (``P_b - 1``) and where the
visual tokens end; a prompt without visual tokens clears it, and the text-only rows of a batch that mixes them with
visual rows are left alone (no coefficients, no edited rows). Decode steps reuse it; keys after the prompt
(generated tokens) belong to no class. Without a KV cache every forward re-runs the prompt plus the generated
tokens: a later forward of the same ``generate()`` with ``use_cache=False`` that extends the recorded prompt's
tokens keeps it; any other forward is a new prompt. The edit applies to the rows from ``rows_from`` on: the
prompt's last row and every generated row (``"prompt_end"``, the official "last row of every forward" in its
cache-consistent form, §5.1.4), or every row after the image (``"after_image"``). With PAI's image-free refine
(``cfg_gamma``) no prompt row is edited, only the generated ones: the official ``llama_modify(..., use_cfg)`` sets a
flag that turns the edit off until the first ``CFGLogits`` call clears it, after the prefill.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch

from .. import kernels
from ..attention import AttentionCall, Intervention, intervene, keys_from, recomputing, refuse_unsupported_call
from ..config import is_int, is_number
from ..forward_inputs import bound_inputs, cached_length, embeddings_only
from ..kernels import ScoreEdit
from ..observe import GenerationStarts
from .base import Method

ROWS = ("prompt_end", "after_image")
IMAGE_INPUTS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask",
                "vision_feature_select_strategy", "vision_aspect_ratio", "batch_num_images")
"""Forward inputs that describe the images (what ``adapter.image_grids`` reads), kept with the prompt."""
NO_ROWS = torch.iinfo(torch.int32).max
"""``rows_from`` of a batch row that the edit leaves alone (after every position)."""


@dataclass
class VisualPrompt:
    """The image-bearing prompt of the current generation, per batch row, in padded sequence positions."""

    visual: torch.Tensor
    """(B, T) bool: visual-token positions (image tokens, and video tokens where the model has them)."""
    real: torch.Tensor
    """(B, T) bool: non-pad positions."""
    prompt_end: torch.Tensor
    """(B,) position of each row's last real prompt token (P_b - 1)."""
    visual_end: torch.Tensor
    """(B,) position just after each row's last visual token (0 without one)."""
    input_ids: torch.Tensor | None = None
    image_inputs: dict | None = None
    """The prefill's image inputs (``IMAGE_INPUTS``), for ``adapter.image_grids(input_ids, **image_inputs)``."""

    @classmethod
    def from_inputs(cls, adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    video: bool = True) -> "VisualPrompt":
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        visual = adapter.visual_token_mask(input_ids, video=video) & real
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        prompt_end = torch.where(real, positions, -1).amax(dim=1)
        visual_end = torch.where(visual, positions + 1, 0).amax(dim=1)
        return cls(visual=visual, real=real, prompt_end=prompt_end, visual_end=visual_end, input_ids=input_ids)

    def key_classes(self, classes: torch.Tensor, n_keys: int, offset: int = 0) -> torch.Tensor:
        """(B, T) per-position values ``classes`` for the ``n_keys`` keys from position ``offset`` on (a sliding
        window's), zero-padded past the prompt (generated keys: 0)."""
        return keys_from(classes, offset, n_keys)

    @property
    def has_visual(self) -> torch.Tensor:
        """(B,) bool: the rows with visual tokens (a mixed batch may hold text-only rows, which no edit touches)."""
        return self.visual.any(dim=1)

    def system(self) -> torch.Tensor:
        """(B, T) bool: the real tokens before each row's first visual token (the system prompt and chat header);
        none in a row without one."""
        positions = torch.arange(self.visual.shape[1], device=self.visual.device)
        first = torch.where(self.visual, positions, self.visual.shape[1]).amin(dim=1)
        return self.real & (positions[None, :] < first[:, None]) & self.has_visual[:, None]


class PromptTracker:
    """Keeps the ``VisualPrompt`` of the current generation, captured by a pre-hook on the multimodal model (the
    module that takes ``input_ids`` and the images: a direct call of it, ``vlm.model(...)``, is a prompt too)."""

    def __init__(self, handle, video: bool = True, on_prompt=None):
        model = handle.adapter.multimodal_model
        self.on_prompt = on_prompt
        """Called with each new prompt, or None for a prompt without visual tokens (PAINT resets its stats)."""
        self.adapter = handle.adapter
        self.name = handle.method
        self.video = video
        """False: video tokens are not visual tokens (image tokens only; warned once)."""
        self._warned = False
        self.prompt: VisualPrompt | None = None
        self.refined: VisualPrompt | None = None
        """The prompt the image-free refine reads: ``prompt``, and also one whose visual tokens are video only where
        the edit takes images only (PAINT: its ``cfg_gamma`` pass still leaves the video out and refines the row)."""
        self.contrast = None
        """The method's ``ImageFreeContrast``, if any: while its image-free pass runs, the tracker and edits pause."""
        self._signature = inspect.signature(model.forward)
        hook = model.register_forward_pre_hook(self._capture, with_kwargs=True)
        handle.on_remove("prompt tracker hook", hook.remove)
        self._generation = GenerationStarts(handle)

    @property
    def paused(self) -> bool:
        return self.contrast is not None and not self.contrast.active

    def _capture(self, module, args, kwargs):
        if self.paused:
            return
        inputs = bound_inputs(self._signature, args, kwargs)
        refuse_unsupported_call(inputs, module.config)  # a fixed-size cache (its masks are 4-D): as every method
        mask = inputs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise ValueError(f"{self.name} reads each row's padding from a 2-D (B, T) attention_mask (1 = real "
                             f"token); got {type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}")
        may_rerun = self._generation.may_rerun(inputs)
        if cached_length(inputs) > 0:
            return  # a decode step: the prompt stays
        input_ids = inputs.get("input_ids")
        if input_ids is None and inputs.get("inputs_embeds") is not None:
            raise embeddings_only(self.name, "image tokens")
        fresh = None if input_ids is None else VisualPrompt.from_inputs(self.adapter, input_ids, mask, self.video)
        video = self.adapter.video_token_id
        if not self.video and not self._warned and input_ids is not None and video is not None and bool(
                (input_ids == video).any()):
            self._warned = True
            warnings.warn(f"{self.name} edits image tokens only: the video tokens of this prompt are left as they "
                          "are (pai and clearsight edit them as visual tokens)", stacklevel=2)
        if fresh is None or not bool(fresh.visual.any()):
            self.prompt = None
            every = None if fresh is None or self.video or self.contrast is None else VisualPrompt.from_inputs(
                self.adapter, input_ids, mask, True)
            self.refined = every if every is not None and bool(every.visual.any()) else None
        elif not (may_rerun and self._continues(fresh)):
            fresh.image_inputs = {key: inputs[key] for key in IMAGE_INPUTS if inputs.get(key) is not None}
            self.prompt = self.refined = fresh
        else:
            return  # a re-run of the current prompt
        if self.on_prompt is not None:
            self.on_prompt(self.prompt)

    def _continues(self, fresh: VisualPrompt) -> bool:
        """Whether ``fresh`` re-runs the recorded prompt's tokens plus generated tokens. Only a forward that
        ``GenerationStarts.may_rerun`` allows is asked; any other (a cache object, one the model makes afresh, a new
        ``generate()``) is a new prompt, even one that extends the last (a chat re-sent with its history, prompt +
        answer scored)."""
        old = self.prompt
        if old is None or fresh.real.shape[0] != old.real.shape[0] or fresh.real.shape[1] <= old.real.shape[1]:
            return False
        t = old.real.shape[1]
        return bool(torch.equal(fresh.input_ids[:, :t], old.input_ids) and torch.equal(fresh.real[:, :t], old.real))


class EditedRows:
    """The first position each batch row's edit starts at, shared by the layers of one method: computed once per
    prompt, with its minimum and maximum as Python ints (one device read, not one per layer or per decode step; on
    CUDA each read is a sync)."""

    def __init__(self, method: "VisualEditMethod", tracker: PromptTracker):
        self.method = method
        self.tracker = tracker
        self._last: tuple | None = None
        """(prompt, (rows_from, its minimum, its maximum)) of the last prompt."""

    def __call__(self, prompt: VisualPrompt) -> tuple[torch.Tensor, int, int]:
        """(B,) the first position each row edits (``NO_ROWS`` for a row without visual tokens), its min and max."""
        if self._last is None or self._last[0] is not prompt:
            rows_from = prompt.prompt_end if self.method.config.rows == "prompt_end" else prompt.visual_end
            if self.tracker.contrast is not None:  # official: the refine's ``use_cfg`` flag keeps the prefill as is
                rows_from = torch.maximum(rows_from, prompt.prompt_end + 1)
            rows_from = torch.where(prompt.has_visual, rows_from, NO_ROWS)  # a text-only row of a mixed batch
            low, high = torch.stack([rows_from.min(), rows_from.max()]).tolist()
            self._last = (prompt, (rows_from, low, high))
        return self._last[1]


class VisualScoreEdit(Intervention):
    """One decoder layer's edit: per-key coefficients from the tracked prompt, times the method's per-head gains.

    With ``method.measures_heads``, at the first forward of each new prompt (its prefill), it first measures the
    share of each row's last prompt token that each head gives to the image keys without the edit, and hands it to
    ``method.record_visual_share``: the gains of that prompt (prefill included, so a forward without a KV cache that
    re-runs the prompt edits it as the prefill did) come from its own shares.
    """

    def __init__(self, method: "VisualEditMethod", tracker: PromptTracker, layer: int, stats: dict,
                 rows: EditedRows):
        self.method = method
        self.tracker = tracker
        self.layer = layer
        self.stats = stats
        self.rows = rows
        self.measured: VisualPrompt | None = None
        """The prompt whose shares were measured last."""
        self._last: tuple | None = None
        """(prompt, lowest, highest last edited key over rows and heads) of the last prompt edited."""

    def visual_share(self, call: AttentionCall, prompt: VisualPrompt) -> torch.Tensor:
        """(B, H): the softmax row of each batch row's last prompt token (causal, its real keys, the layer's window
        and soft cap), without the edit, summed over the image keys."""
        b, _, m, n = call.shape
        offset, device = call.key_offset, call.query.device
        end = prompt.prompt_end.to(device)
        query = call.query[torch.arange(b, device=device), :, end - offset - (n - m)][:, :, None]
        keys = torch.arange(n, device=device)[None, :] + offset
        visible = prompt.key_classes(prompt.real, n, offset).to(device) & (keys <= end[:, None])
        if call.window is not None:
            visible &= keys > end[:, None] - call.window
        rows = kernels.attention_rows(query, call.key, key_bias=kernels.padding_to_bias(visible), scale=call.scaling,
                                      softcap=call.softcap)[:, :, 0]
        return (rows * prompt.key_classes(prompt.visual, n, offset).to(device)[:, None, :]).sum(-1)

    def score_edit(self, call: AttentionCall) -> ScoreEdit | None:
        prompt = self.tracker.prompt
        if prompt is None or self.tracker.paused:  # the tracker keeps only prompts with image tokens
            return None
        if self.method.measures_heads and self.measured is not prompt:
            self.method.record_visual_share(self.layer, self.visual_share(call, prompt), prompt.has_visual)
            self.measured = prompt
        if self.method.is_neutral():
            return None  # zero margins measure the plain model's shares (calibration, spec §5.4) and edit nothing
        n, offset = call.shape[3], call.key_offset
        gains = torch.atleast_2d(self.method.head_gains(self.layer, prompt.has_visual))
        gains = gains.to(call.query.device)[:, :, None]
        abs_coef, mul_coef = self.method.coefficients(prompt)
        rows_from, rows_min, rows_max = self.rows(prompt)
        if rows_min >= offset + n:
            return None  # no row of this call is edited (a prefill under the refine): the plain attention
        self.stats["edited_calls"] += not recomputing()
        lowest, highest = self._last_edited_keys(prompt, gains, abs_coef, mul_coef)
        every = lowest >= offset and highest < offset + n  # each head's last edited key is among this call's
        return ScoreEdit(
            abs_coef=None if abs_coef is None else prompt.key_classes(abs_coef, n, offset)[:, None, :] * gains,
            mul_coef=None if mul_coef is None else prompt.key_classes(mul_coef, n, offset)[:, None, :] * gains,
            rows_from=(rows_from - offset).to(call.query.device),  # the edit counts rows in this call's keys
            rows_min=rows_min - offset,
            every_head_from=rows_max - offset if every else None,
        )

    def _last_edited_keys(self, prompt: VisualPrompt, gains: torch.Tensor, *coefs) -> tuple[int, int]:
        """The lowest and the highest, over batch rows and heads, of the last key position whose score the edit
        changes (-1 for a (row, head) it changes nowhere): with ``coefs`` (B, T) per prompt position and ``gains``
        (B|1, H, 1). A call changes every head of every row iff each one's last edited key is among its keys, which
        for keys reaching past the prompt (every decode step, a sliding window's too) is exactly the lowest being at
        or after the call's first key. Read from the device once per prompt (on CUDA a read is a sync)."""
        if self._last is None or self._last[0] is not prompt:
            edited = sum((coef != 0).to(gains.device)[:, None, :] & (gains != 0) for coef in coefs if coef is not None)
            positions = torch.arange(edited.shape[-1], device=edited.device)
            last = torch.where(edited > 0, positions, -1).amax(dim=-1)
            self._last = (prompt, *torch.stack([last.min(), last.max()]).tolist())
        return self._last[1], self._last[2]


def layer_range(layers, num_layers: int, default: tuple[float, float]) -> range:
    """Decoder layers ``[start, end)``: ``layers`` as given (``end`` None = all), else ``default`` as fractions of
    the depth of the model the paper used (e.g. 2/32), scaled to this model and never empty."""
    if layers is not None:
        start, end = layers
        return range(start, num_layers if end is None else end)
    start = min(round(default[0] * num_layers), num_layers - 1)
    return range(start, max(start + 1, round(default[1] * num_layers)))


class VisualEditMethod(Method):
    """Base of the VLM score-edit methods: subclasses give the per-position coefficients and the default layers."""

    kinds = ("vlm",)
    resources = ("score_edit",)
    reads = ("token_layout",)
    default_layers: tuple[float, float] = (0.0, 1.0)
    measures_heads: bool = False
    """Whether the layers' edits read each head's visual share (``record_visual_share``)."""

    def head_gains(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """(H,), or (B, H) per batch row, factor on the edit's coefficients for each head of ``layer`` (1: the
        official uniform edit); ``rows`` (B,) bool: the rows the edit acts on (those with an image)."""
        return torch.ones(self.adapter.num_heads)

    def record_visual_share(self, layer: int, share: torch.Tensor, rows: torch.Tensor) -> None:
        """(B, H) share of each row's last prompt token that each head of ``layer`` gives to the image, without the
        edit, measured at the prefill of a new prompt; ``rows`` (B,) bool: the rows with an image."""

    edits_video = True
    """Whether video tokens are visual tokens like image tokens (PAI, ClearSight); PAINT, which selects tokens per
    image from the vision tower, edits image tokens only."""

    def new_prompt(self, prompt: VisualPrompt | None) -> None:
        """A new prompt was recorded (None: one without visual tokens, which nothing edits)."""

    def coefficients(self, prompt: VisualPrompt) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B, T) ``abs_coef`` and ``mul_coef`` per prompt position (None where the method has none)."""
        raise NotImplementedError

    def is_neutral(self) -> bool:
        raise NotImplementedError

    def supports_assisted_decoding(self) -> bool:
        """Only where nothing depends on the prompt's last token: every row after the image edited alike
        (``rows="after_image"``), no head shares measured at the prompt's end, no image-free refine."""
        if self.refines():
            return False
        return not self.measures_heads and (self.is_neutral() or self.config.rows == "after_image")

    def layers(self) -> range:
        return layer_range(self.config.layers, self.adapter.num_layers, self.default_layers)

    def keeps_prompt_state(self) -> bool:
        return not self.is_neutral() or self.refines() or self.measures_heads  # what attach tracks the prompt for

    def refines(self) -> bool:
        """Whether PAI's image-free refine runs: ``cfg_gamma`` set and not 1 (at 1 the official ``CFGLogits``
        returns the scores as they are)."""
        return getattr(self.config, "cfg_gamma", None) not in (None, 1)

    def check_model(self) -> None:
        check_layer_range(self.config, self.adapter.num_layers)

    def attach(self, handle) -> None:
        edits = not self.is_neutral()
        handle.stats.update(layers=list(self.layers()) if edits else [], heads=self.adapter.num_heads, edited_calls=0)
        if not self.keeps_prompt_state():
            return
        tracker = PromptTracker(handle, video=self.edits_video, on_prompt=self.new_prompt)
        if self.refines():
            from .image_contrast import ImageFreeContrast

            tracker.contrast = ImageFreeContrast(handle, tracker, self.config.cfg_gamma)
        if edits or self.measures_heads:
            modules, rows = self.adapter.attention_modules, EditedRows(self, tracker)
            intervene(handle, {modules[layer]: VisualScoreEdit(self, tracker, layer, handle.stats, rows)
                               for layer in self.layers()})


def check_cfg_gamma(config) -> None:
    """``cfg_gamma``: None (off) or a finite number > 0."""
    gamma = config.cfg_gamma
    if gamma is not None and not (is_number(gamma) and gamma > 0):
        config.invalid("cfg_gamma", "None or a finite number > 0 (1.1 in the published results)")


CFG_GAMMA_DOC = ("PAI's image-free logits refine gamma*(z_img - z_free) + z_free with the 0.1 plausibility cutoff: "
                 "None or 1 = off, 1.1 = every published PAI / PAINT result (one image-free forward per step; the "
                 "attention edit then starts at the first generated token, as in the official code)")


def check_layer_range(config, depth: int) -> None:
    """``layers`` (start, end) fits a model of ``depth`` decoder layers."""
    layers = config.layers
    if layers is not None:
        end = depth if layers[1] is None else layers[1]
        if not 0 <= layers[0] < end <= depth:
            config.invalid("layers", f"(start, end) with 0 <= start < end <= {depth} (end None = {depth})")


def check_layers(config) -> None:
    """``layers``: None, or (start, end) with ints, ``end`` None for "to the last layer"."""
    layers = config.layers
    if layers is None:
        return
    ok = (isinstance(layers, (tuple, list)) and len(layers) == 2 and is_int(layers[0])
          and (layers[1] is None or is_int(layers[1])))
    if not ok:
        config.invalid("layers", "None or (start, end) with int start and int-or-None end")
    object.__setattr__(config, "layers", tuple(None if index is None else int(index) for index in layers))
