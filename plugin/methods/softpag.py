"""SoftPAG, PAG and HeadHunter head sets: head-level perturbed-attention guidance on MM-DiTs (SD3/3.5, FLUX.1).

Ahn et al., *Fine-Grained Perturbation Guidance via Attention Head Selection* (v1; v4 retitled *Where and How to
Perturb: On the Design of Perturbation Guidance in Diffusion and Flow Models*), NeurIPS 2025, arXiv 2506.10978;
official code ``cvlab-kaist/HeadHunter`` (``pipeline_distributed.py`` and its patched diffusers
``attention_processor.py::skip_attention``). PAG: Ahn et al., ECCV 2024, arXiv 2403.17377. Spec ``headhunter.md``.

The algorithm box:
1. A set S of (layer, head) pairs, each with a weight u in [0, 1] (paper Eq. 7, SoftPAG).
2. The weak model: in every selected head the attention map is moved toward the identity,
   ``A' = (1 - u) A + u I``, so the head's output is ``(1 - u) softmax(QK^T / sqrt d) V + u V`` (attention is linear in
   the map). u = 1 is PAG (Eq. 6 restricted to S), u = 0 the model itself.
3. Guidance (paper Eq. 5, diffusers convention as in the official pipeline and ``PAGMixin``):
   ``eps = eps_uncond + g (eps_cond - eps_uncond) + w (eps_cond - eps_ptb)``, ``eps_ptb`` = the weak model on the
   conditional prompt, at every denoising step; without CFG (FLUX's distilled guidance) ``eps_cond + w (...)``.

"Identity" on joint attention has two meanings (spec §1.5): ``joint_identity`` (default) is the official code's and
diffusers' guider's: every token of the joint image+text sequence keeps only its own value. ``image_identity`` is
diffusers' legacy SD3 PAG (``PAGJointAttnProcessor2_0``): image queries see only their own image key plus every text
key, text rows are untouched.

Layers are the transformer blocks in forward order: SD3 ``transformer_blocks[l].attn`` (SD3.5's image-only ``attn2``
is never perturbed), FLUX ``transformer_blocks[0..18]`` then ``single_transformer_blocks`` as layers 19..56. Where
diffusers 0.42 is wrong (spec §4): qk-norm is applied (the adapter's stock q/k/v), dual-attention blocks work, layer
names match exactly (``"blocks.1"`` is block 1, never 10 or 11), the perturbation runs on every step unless
``start``/``stop`` limit it, and FLUX works.
"""

from __future__ import annotations

import numbers
import os
import re
import warnings
from dataclasses import dataclass

import torch

from .. import kernels
from ..attention import AttentionCall, Intervention, intervene, recomputing
from ..config import MethodConfig, is_int, is_number, option
from ..guidance import GuidanceState, PerturbedGuidance
from ..headhunter import HeadSet, load_heads
from ..registry import register
from .base import Method

MODES = ("joint_identity", "image_identity")
PATHS = ("fast", "reference")
DEFAULT_SCALE = {"sd3": 3.0, "flux": 8.0}
"""w when ``scale=None``: 3.0 on SD3 (paper Table 1, official ``run.sh``), 8.0 on FLUX (official ``run_flux.sh``)."""


# ---- options -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuidanceOptions(MethodConfig):
    scale: object = option(None, "w in eps_cond + w (eps_cond - eps_ptb) (paper Eq. 5); None = 3.0 on SD3 (paper), "
                                 "8.0 on FLUX (official run_flux.sh)")
    mode: str = option("joint_identity", "identity over the whole joint image+text map (paper code, diffusers guider) "
                                         "or over the image-image block only (diffusers' legacy SD3 PAG)",
                       choices=MODES)
    start: float = option(0.0, "first fraction of the denoising steps that is perturbed (paper: every step)")
    stop: float = option(1.0, "perturb while step / steps < stop (paper: every step)")
    batch: bool = option(True, "run the perturbed rows in the cond/uncond transformer call (one call, diffusers PAG "
                               "layout); False = a second call on the conditional rows (lower peak memory)")
    late_fork: bool = option(True, "with batch=True, append the perturbed rows at the first perturbed block, not at "
                                   "the transformer's input: earlier blocks run at the plain batch size (spec §5.5; "
                                   "equal up to batch-size-dependent rounding)")
    path: str = option("fast", "'fast': SDPA + per-head lerp toward V (kernels' blend); 'reference': the explicit "
                               "map (1-u)A + uI, for checking", choices=PATHS)

    def validate(self) -> None:
        if self.scale is not None and not (is_number(self.scale) and self.scale >= 0):
            self.invalid("scale", "None or a finite number >= 0")
        for name in ("start", "stop"):
            value = getattr(self, name)
            if not (is_number(value) and 0 <= value <= 1):
                self.invalid(name, "a number in [0, 1]")
        if self.start > self.stop:
            self.invalid("stop", f"a number >= start ({self.start}) (start == stop perturbs no step)")
        for name in ("batch", "late_fork"):
            if not isinstance(getattr(self, name), bool):
                self.invalid(name, "True or False", TypeError)


def _check_heads_syntax(config: MethodConfig, name: str) -> None:
    value = getattr(config, name)
    if value is None or isinstance(value, (str, os.PathLike, HeadSet)):
        return
    allowed = ("None, a list of (layer, head) pairs, {layer: [heads] | 'all'}, {(layer, head): u}, 'layer:<l>', "
               "a HeadSet, a .json head-set file or 'paper:<model>/<name>'")
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, tuple):
                if not (len(key) == 2 and is_number(item)):
                    config.invalid(name, allowed + " (per-head u in [0, 1])", TypeError)
                if not 0 <= item <= 1:
                    config.invalid(name, allowed + " (per-head u in [0, 1])")
            elif not isinstance(key, (int, str)) or isinstance(key, bool):
                config.invalid(name, allowed, TypeError)
            elif not (item == "all" or isinstance(item, (list, tuple, range))):
                config.invalid(name, allowed, TypeError)
        return
    if isinstance(value, (list, tuple)):
        if all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
            return
    config.invalid(name, allowed, TypeError)


@dataclass(frozen=True)
class SoftPAGConfig(GuidanceOptions):
    heads: object = option(None, "the perturbed heads: (layer, head) pairs, {layer: [heads] | 'all'}, "
                                 "{(layer, head): u}, 'layer:<l>', a HeadSet / .json file; None = none (a no-op)")
    u: float = option(0.5, "SoftPAG weight toward the identity (Eq. 7); 1 = PAG. 0.5 removes artifacts and is the "
                           "paper's best FID (App. B, Figs. 11-12)")

    def validate(self) -> None:
        super().validate()
        if not (is_number(self.u) and 0 <= self.u <= 1):
            self.invalid("u", "a number in [0, 1]")
        _check_heads_syntax(self, "heads")


@dataclass(frozen=True)
class PAGConfig(GuidanceOptions):
    layers: object = option((1,), "layers whose every head is perturbed (u = 1): indices, or exact block names "
                                   "('blocks.1', 'transformer_blocks.1', 'single_transformer_blocks.0'); default "
                                   "block 1 (diffusers' SD3 PAG default 'blocks.1')")

    def validate(self) -> None:
        super().validate()
        layers = self.layers if isinstance(self.layers, (list, tuple)) else [self.layers]
        if not layers or not all(isinstance(x, str) or (is_int(x))
                                 for x in layers):
            self.invalid("layers", "a layer index, a block name, or a non-empty list of them", TypeError)


@dataclass(frozen=True)
class HeadHunterConfig(SoftPAGConfig):
    heads: object = option(None, "the guided heads (required): a HeadSet, a .json head-set file from "
                                 "nograd.headhunter.search, 'paper:<model>/<name>' or (layer, head) pairs")
    top: object = option(None, "use only the first `top` heads of the set (its selection order; the paper's top-k "
                               "prefixes, k=9 with u=0.5 for general quality); None = all")

    def validate(self) -> None:
        super().validate()
        if self.heads is None:
            self.invalid("heads", "a HeadSet, a .json head-set file from nograd.headhunter.search, "
                                  "'paper:<model>/<name>' or a list of (layer, head) pairs")
        if self.top is not None and not (is_int(self.top)
                                         and self.top >= 0):
            self.invalid("top", "None or an integer >= 0")


# ---- head addressing -------------------------------------------------------------------------------------------------
def layer_names(adapter) -> list[str]:
    """The block name of every layer, in forward order (``transformer_blocks.0``, ...,
    ``single_transformer_blocks.0``)."""
    return [f"{name}.{i}" for name in adapter.block_lists for i in range(len(getattr(adapter.model, name)))]


def layer_modules(adapter) -> list:
    """The perturbable attention module of every layer (the block's joint ``attn``; never SD3.5's ``attn2``)."""
    return [block.attn for block in adapter.decoder_layers]


def as_index(value) -> int | None:
    """``value`` as an int if it is an integer (numpy's included, ``bool`` excluded), else None."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None


def layer_index(adapter, layer, option_name: str = "heads") -> int:
    """A layer index from an int or an exact block name (``blocks.1`` means ``transformer_blocks.1``)."""
    names = layer_names(adapter)
    if isinstance(layer, str):
        key = re.sub(r"\.attn$", "", layer.strip())
        key = re.sub(r"^layer:", "", key)
        if key.isdigit():
            layer = int(key)
        else:
            if key.startswith("blocks."):
                key = "transformer_" + key
            if key not in names:
                raise ValueError(f"{option_name}: no layer named {layer!r}; layers are {names[0]} .. {names[-1]} "
                                 f"(or indices 0..{len(names) - 1}), matched exactly")
            return names.index(key)
    if as_index(layer) is None:
        raise ValueError(f"{option_name}: layer {layer!r} is neither a layer index nor a block name")
    layer = as_index(layer)
    if not 0 <= layer < len(names):
        raise ValueError(f"{option_name}: layer {layer} is out of range; this {type(adapter.model).__name__} has "
                         f"{len(names)} layers x {adapter.num_heads} heads (indices 0..{len(names) - 1})")
    return int(layer)


def head_table(spec, u: float, adapter, option_name: str = "heads", top: int | None = None) -> torch.Tensor:
    """The (L, H) float table of per-head weights u that ``spec`` selects (0 = not perturbed)."""
    num_layers, num_heads = len(adapter.decoder_layers), adapter.num_heads
    table = torch.zeros(num_layers, num_heads)
    if spec is None:
        return table
    if isinstance(spec, (str, os.PathLike)) and not str(spec).startswith("layer:"):
        spec = load_heads(spec)
    if isinstance(spec, HeadSet):
        spec.check(adapter)
        if not spec.complete:  # a search stopped by its budget or an error, saved to be resumed
            if not spec.heads:
                raise ValueError(f"{option_name}: this head set is an unfinished search with no round done yet; "
                                 "resume it (nograd.headhunter.search with the same save=) before applying it")
            warnings.warn(f"{option_name}: this head set is an unfinished search ({len(spec.rounds)} of "
                          f"{spec.config.get('rounds', '?')} rounds): applying the heads of the rounds done",
                          stacklevel=2)
        spec = [tuple(pair) for pair in spec.heads]
    if top is not None and isinstance(spec, (list, tuple)):
        if top > len(spec):
            raise ValueError(f"top={top} asks for more heads than the set holds: an int in 0..{len(spec)} (the set's "
                             "first `top` heads), or None for all of them")
        spec = list(spec)[:top]
    elif top is not None:
        raise ValueError(f"top={top} selects a prefix of an ordered head list or HeadSet; {option_name}={spec!r} "
                         "has no order (pass a list of (layer, head) pairs, or top=None)")

    def put(layer, head, weight):
        index = layer_index(adapter, layer, option_name)
        if as_index(head) is None or not 0 <= as_index(head) < num_heads:
            raise ValueError(f"{option_name}: head {head!r} of layer {layer!r} is out of range; this "
                             f"{type(adapter.model).__name__} has {num_layers} layers x {num_heads} heads")
        table[index, as_index(head)] = float(weight)

    if isinstance(spec, str):  # "layer:<l>"
        spec = {spec: "all"}
    if isinstance(spec, dict):
        for key, item in spec.items():
            if isinstance(key, tuple):
                put(key[0], key[1], item)
            else:
                for head in (range(num_heads) if item == "all" else item):
                    put(key, head, u)
    else:
        for layer, head in spec:
            put(layer, head, u)
    return table


# ---- the perturbation on one layer ------------------------------------------------------------------------------
def image_identity_target(query, key, value, image: slice, text: slice, scale: float) -> torch.Tensor:
    """diffusers' legacy SD3 PAG target for the image rows (B, H, N_img, D), fp32: each image query attends over
    its own image key and every text key (the image-image block of the map replaced by the identity), in
    O(N_img N_txt D) instead of a dense S x S mask (spec §5.3)."""
    q, k, v = query[:, :, image].float(), key[:, :, image].float(), value[:, :, image].float()
    self_logit = (q * k).sum(-1, keepdim=True) * scale
    text_k, text_v = key[:, :, text].float(), value[:, :, text].float()
    logits = torch.cat([self_logit, torch.matmul(q, text_k.transpose(-1, -2)) * scale], dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return probs[..., :1] * v + torch.matmul(probs[..., 1:], text_v)


def reference_perturbed(query, key, value, u: torch.Tensor, mode: str, spans: dict, scale: float) -> torch.Tensor:
    """The obvious, eager reference (fp32, materialised map): ``((1 - u) A + u A_target) V`` per head, with
    ``A_target`` = I (``joint_identity``) or the image-identity map (``image_identity``; text rows keep A).
    ``u`` (B, H). Returns (B, H, S, D) fp32."""
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    probs = torch.softmax(logits, dim=-1)
    s = logits.shape[-1]
    if mode == "joint_identity":
        target = torch.eye(s, dtype=probs.dtype, device=probs.device).expand_as(probs)
    else:
        image = spans["image"]
        allowed = torch.ones(s, s, dtype=torch.bool, device=probs.device)
        allowed[image, image] = torch.eye(image.stop - image.start, dtype=torch.bool, device=probs.device)
        target = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        text_rows = torch.ones(s, dtype=torch.bool, device=probs.device)
        text_rows[image] = False
        target = torch.where(text_rows[:, None], probs, target)
    weight = u.float()[:, :, None, None].to(probs.device)
    return torch.matmul((1 - weight) * probs + weight * target, value.float())


class HeadPerturbation(Intervention):
    """One layer: on the rows the guidance marks as perturbed, move the selected heads toward the identity."""

    def __init__(self, layer: int, weights: torch.Tensor, mode: str, path: str, state: GuidanceState, stats: dict):
        self.layer = layer
        self.weights = weights
        self.mode = mode
        self.path = path
        self.state = state
        self.stats = stats

    def _u(self, call: AttentionCall) -> torch.Tensor | None:
        """(B, H) weights of this call (0 outside the perturbed rows), or None; computed once per call (kept on the
        call, so nothing of it outlives the call). A host tensor: which heads are skipped, blended or counted is read
        without a device sync (the kernels move what they compute with)."""
        key = ("softpag weights", self.layer)
        if key not in call.extras:
            call.extras[key] = self._weights_of(call)
        return call.extras[key]

    def _weights_of(self, call: AttentionCall) -> torch.Tensor | None:
        rows = self.state.ptb
        if rows is None:
            return None
        batch, heads = call.query.shape[:2]
        u = torch.zeros(batch, heads)
        table = self.state.row_weights
        u[rows] = self.weights if table is None else table[:, self.layer].float()
        if not bool((u > 0).any()):
            return None
        self.stats["perturbed_attention_calls"] += not recomputing()
        return u

    def _count_skipped(self, call: AttentionCall, u: torch.Tensor, queries: int, keys: int) -> None:
        """Count the u = 1 heads and the attention FLOPs (``4 queries keys head_dim``) they do not compute."""
        skipped = int((u == 1).sum())
        self.stats["identity_heads_skipped"] = self.stats.get("identity_heads_skipped", 0) + skipped
        self.stats["attention_flops_saved"] = (self.stats.get("attention_flops_saved", 0)
                                               + 4 * queries * keys * call.query.shape[-1] * skipped)

    def blend(self, call: AttentionCall) -> torch.Tensor | None:
        """``joint_identity``: u itself (u = 1 heads skip the attention product, nograd.kernels' blend).
        ``image_identity``: 1 on the u = 1 heads, whose image rows the edit replaces by the target and whose text
        rows it recomputes alone, so their full attention product is skipped; 0 elsewhere."""
        if self.path != "fast":
            return None
        u = self._u(call)
        if u is None:
            return None
        if self.mode == "joint_identity":
            self._count_skipped(call, u, call.shape[2], call.shape[3])
            return u
        if not bool((u == 1).any()):
            return None
        image = call.extras["spans"]["image"]
        images = image.stop - image.start  # each image row still attends to its own key and the text keys
        self._count_skipped(call, u, images, images - 1)
        return (u == 1).float()

    def output_edit(self, call: AttentionCall):
        if self.mode == "joint_identity" and self.path == "fast":
            return None
        u = self._u(call)
        if u is None:
            return None
        rows = torch.nonzero((u > 0).any(dim=1)).flatten()
        spans = call.extras["spans"]

        def edit(out: torch.Tensor) -> torch.Tensor:
            q, k, v = call.query[rows], call.key[rows], call.value[rows]
            weight = u[rows]
            edited = out.clone()
            if self.path == "reference":
                full = reference_perturbed(q, k, v, weight, self.mode, spans, call.scaling)
                chosen = (weight > 0)[:, :, None, None].to(out.device)
                edited[rows] = torch.where(chosen, full.to(out.dtype), out[rows])
                return edited
            image, text = spans["image"], spans["text"]
            edited_rows = edited[rows]
            skipped = weight == 1  # their attention was skipped (``blend``): the text rows are computed here
            if bool(skipped.any()):
                text_rows = kernels.attention(q[:, :, text], k, v, scale=call.scaling, key_bias=_rows_of(call.key_bias,
                                              rows), mask=_text_mask(call.mask, rows, text))
                edited_rows[:, :, text] = torch.where(skipped[:, :, None, None].to(out.device), text_rows,
                                                      edited_rows[:, :, text])
            target = image_identity_target(q, k, v, image, text, call.scaling)
            part = edited_rows[:, :, image]
            weight = weight.float()[:, :, None, None].to(out.device)
            edited_rows[:, :, image] = torch.lerp(part.float(), target, weight).to(out.dtype)
            edited[rows] = edited_rows
            return edited

        return edit


def _rows_of(bias: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """A (B or 1, H or 1, N) key bias restricted to the batch ``rows``."""
    return bias if bias is None or bias.shape[0] == 1 else bias[rows]


def _text_mask(mask: torch.Tensor | None, rows: torch.Tensor, text: slice) -> torch.Tensor | None:
    """A 4-D mask restricted to the batch ``rows`` and the text queries."""
    if mask is None:
        return None
    mask = mask if mask.shape[0] == 1 else mask[rows]
    return mask[..., text, :] if mask.shape[-2] > 1 else mask


# ---- the methods -----------------------------------------------------------------------------------------------------
class _HeadGuidance(Method):
    """Shared attach: a head table -> interventions on the layers that hold a selected head + the guidance hooks."""

    kinds = ("dit",)
    families = ("sd3", "flux")
    resources = ("perturbed_guidance",)

    def table(self) -> torch.Tensor:
        raise NotImplementedError

    def check_model(self) -> None:
        self._table = self.table()

    def scale(self) -> float:
        scale = self.config.scale
        return float(DEFAULT_SCALE.get(self.adapter.family, 3.0) if scale is None else scale)

    def fork_modules(self, first: int) -> list | None:
        """The modules whose inputs carry the perturbed rows under a late fork: the blocks from ``first`` on and the
        output norm (which reads ``temb``); None (fork at the input) when ``late_fork`` is off or the model has no
        ``norm_out`` (SD3 and FLUX have one)."""
        norm_out = getattr(self.adapter.model, "norm_out", None)
        if not self.config.late_fork or norm_out is None:
            return None
        return list(self.adapter.decoder_layers[first:]) + [norm_out]

    def attach(self, handle) -> None:
        table, config, adapter = self._table, self.config, self.adapter
        scale = self.scale()
        heads = [(int(l), int(h)) for l, h in torch.nonzero(table > 0).tolist()]
        if scale == 0 or config.start >= config.stop:
            heads = []  # nothing is perturbed: no head touched, the model untouched (bit-identical)
        layers = sorted({l for l, _ in heads})
        names = layer_names(adapter)
        handle.stats.update(heads=heads, layers=[names[l] for l in layers], scale=scale, mode=config.mode,
                            u={f"{l},{h}": float(table[l, h]) for l, h in heads},
                            perturbed_calls=0, perturbed_rows=0, perturbed_attention_calls=0, extra_flops=0,
                            identity_heads_skipped=0, attention_flops_saved=0)
        handle.stats["heads_touched"] = len(heads)
        if not heads:
            return
        guidance = PerturbedGuidance(adapter.model, scale, batch=config.batch, start=config.start, stop=config.stop,
                                     stats=handle.stats, fork=self.fork_modules(layers[0]))
        modules = layer_modules(adapter)
        intervene(handle, {modules[l]: HeadPerturbation(l, table[l], config.mode, config.path, guidance.state,
                                                        handle.stats) for l in layers})
        guidance.install(handle)
        handle.stats["fork_block"] = layers[0] if guidance.fork else 0
        handle.expose("perturbed_only", guidance.perturbed_only)
        handle.expose("guidance", guidance, live_only=False)  # the state itself, for the head search


@register
class SoftPAG(_HeadGuidance):
    name = "softpag"
    summary = ("head-level perturbed-attention guidance: chosen heads' maps moved toward the identity by u, "
               "guided against the conditional prediction")
    paper = "Fine-Grained Perturbation Guidance via Attention Head Selection (HeadHunter / SoftPAG)"
    arxiv = "2506.10978"
    Config = SoftPAGConfig

    def table(self) -> torch.Tensor:
        return head_table(self.config.heads, self.config.u, self.adapter)


@register
class PAG(_HeadGuidance):
    name = "pag"
    summary = "layer-level perturbed-attention guidance: every head of the chosen layers attends to itself (u = 1)"
    paper = "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance"
    arxiv = "2403.17377"
    Config = PAGConfig

    def table(self) -> torch.Tensor:
        layers = self.config.layers if isinstance(self.config.layers, (list, tuple)) else [self.config.layers]
        return head_table({layer: "all" for layer in layers}, 1.0, self.adapter, "layers")


@register
class HeadHunter(_HeadGuidance):
    name = "headhunter"
    summary = "SoftPAG on a head set found by nograd.headhunter.search (or one of the paper's example heads)"
    paper = SoftPAG.paper
    arxiv = SoftPAG.arxiv
    Config = HeadHunterConfig

    def table(self) -> torch.Tensor:
        return head_table(self.config.heads, self.config.u, self.adapter, top=self.config.top)
