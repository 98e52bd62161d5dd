"""FRANK: training-free, layer-wise merging of a reasoning LLM into a multimodal LLM (Wei and Chen, "Training-Free
Reasoning and Reflection in MLLMs", arXiv 2505.16151; spec ``frank.md``).

The MLLM's language model (θ_V) and a reasoning LLM (θ_R) are two fine-tunes of one base LLM (θ_0); their task
vectors are τ_t = θ_t − θ_0. Each decoder layer l is merged on its own:

1. Prior [paper idea; form ours]: π_V(l), how much layer l serves vision. From the unmodified MLLM's measured share
   r_l of text->image attention (text queries after the last image token, mean over heads and queries), fitted with
   r̂(l) = A·exp(−β·l/(L−1)) + C (A, β, C ≥ 0, least squares) and scaled to [0, 1] (``prior_normalize="minmax"``:
   layer 0 keeps the MLLM, the last layer takes the reasoning LLM). Without calibration prompts, the data-free
   default π_V(l) = exp(−3·l/(L−1)) (ours, not the paper's).
2. Closed form [reconstructed: MetaGPT's Taylor/NTK/orthogonality derivation per layer, weighted by the prior; the
   paper's Eq. 13/15 were not available]: a_t = ‖τ_t(l)‖² over the layer's tensors,
   λ_V = π_V·a_V / (π_V·a_V + π_R·a_R), λ_R = 1 − λ_V (π_R = 1 − π_V; 0/0 -> λ_V = 1).
3. Merge: θ(l) = θ_0 + λ_V τ_V + λ_R τ_R = lerp(θ_V, θ_R, λ_R) (the base cancels; it is needed for a_V, a_R only);
   layers with λ_R = 0 stay bit-identical. The vision tower, projector, embeddings, final norm and lm_head stay the
   MLLM's (``non_layer_policy="mllm"``, ours: the paper does not say); ``"reasoning"`` takes the reasoning LLM's and
   ``"merge"`` merges them by the rule with the coefficients of the nearest decoder layer (ours; spec §1.3 offers both
   where the vocabularies are identical).

Peer rules on the same machinery (``rule=``): ``linear`` (lerp by a fixed λ_R), ``task_arithmetic``, ``ties`` and
``dare_ties`` (``peft.utils.merge_utils`` on the task vectors; need ``base``). ``nograd.apply`` merges in place
(``remove()`` restores bit-for-bit); ``nograd.merge`` streams safetensors checkpoints (``plugin/merge.py``).
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ..attention import AttentionCall, Intervention, intervene
from ..config import MethodConfig, is_int, is_number, option
from ..forward_inputs import execution_device
from ..handle import Handle
from ..registry import register
from .base import Method

M = importlib.import_module("nograd.merge")  # the module (``nograd.merge`` the attribute is the function)

COEFS = ("frank", "metagpt", "prior")
PRIORS = ("auto", "attention", "exp")
NON_LAYER_POLICIES = ("mllm", "reasoning", "merge")
WEAK_DECAY = 0.05
"""A fitted share of image attention that varies by less than this fraction of its largest value over depth is
warned about: min-max scaling makes any decay a full prior (ours; real MLLMs' shares fall several-fold)."""
ROLE_DEPTH = {"embed": 0, "norm": -1, "lm_head": -1}
"""The decoder layer whose coefficients a non-layer tensor takes under ``non_layer_policy="merge"``: the embeddings
feed the first layer, the final norm and lm_head read the last one."""


def _is_source(value) -> bool:
    return isinstance(value, (str, os.PathLike, nn.Module, M.Checkpoint, M.Side))


@dataclass(frozen=True)
class FrankConfig(MethodConfig):
    reasoning: object = option(None, "the reasoning LLM: a loaded model or a safetensors checkpoint folder (required)")
    base: object = option(None, "their common base LLM (model or folder); needed by coef 'frank'/'metagpt' and by "
                                "task_arithmetic/ties/dare_ties (only for a_V, a_R under 'frank')")
    rule: str = option("frank", "merge rule: 'frank' (the paper's per-layer closed form), or the peers 'linear', "
                                "'task_arithmetic', 'ties', 'dare_ties'", choices=M.RULES)
    coef: str = option("frank", "rule='frank': 'frank' = λ_V = π_V a_V/(π_V a_V + π_R a_R) (spec Eq. 15*, "
                                "reconstructed), 'metagpt' = a_V/(a_V + a_R) (Eq. 13*), 'prior' = λ_V = π_V",
                       choices=COEFS)
    lambda_r: object = option(None, "manual λ_R: one number or one per decoder layer (rule 'frank' overrides the "
                                    "closed form; rule 'linear' default 0.5, ours)")
    weights: object = option((1.0, 1.0), "(λ_V, λ_R) of task_arithmetic/ties/dare_ties (ours: plain sum, as in "
                                         "chat-vector recipes)")
    density: float = option(0.5, "ties/dare_ties: fraction of each task vector kept (ours; mergekit's examples)")
    majority_sign_method: str = option("total", "ties/dare_ties sign election (peft)", choices=("total", "frequency"))
    seed: int = option(0, "dare_ties: seed of the random drop masks (one per tensor, from seed, layer and name)")
    prior: object = option("auto", "π_V per layer: 'attention' (measured on `calibration`), 'exp' (data-free "
                                    "exp(-prior_beta·l/(L-1)), ours), 'auto' (attention if calibration is given, "
                                    "else exp), or a list of L numbers in [0, 1]")
    calibration: object = option(None, "image+question inputs for the prior: a dict of model inputs (processor "
                                       "output with input_ids) or a list of them; the paper's set is unknown")
    prior_beta: float = option(3.0, "decay of the data-free prior (ours, not the paper's)")
    prior_normalize: str = option("minmax", "fitted share -> prior: 'minmax' (layer 0 -> 1, last -> 0) or 'first' "
                                            "(r̂(l)/r̂(0)); ours", choices=("minmax", "first"))
    query_tokens: str = option("after_visual", "queries whose image share is measured: text after the last image "
                                               "token, or every non-image token (ours)",
                               choices=("after_visual", "all_text"))
    max_calib_samples: int = option(64, "at most this many calibration inputs are run (ours)")
    keep_shallow_layers: int = option(0, "the first k decoder layers keep the MLLM exactly (π_V = 1; every rule)")
    layers: object = option(None, "decoder layers (start, end) that may be merged; None = all (paper: all)")
    non_layer_policy: str = option("mllm", "embeddings, final norm, lm_head: keep the MLLM's ('mllm', ours: the paper "
                                           "does not say), take the reasoning LLM's ('reasoning'; same vocab only) or "
                                           "merge them by the rule with the coefficients of the nearest decoder layer "
                                           "('merge': embeddings with the first, norm and lm_head with the last; same "
                                           "vocab and added tokens only)",
                                   choices=NON_LAYER_POLICIES)
    device: object = option(None, "where the arithmetic runs: None = each MLLM tensor's device (streamed: 'cpu'), "
                                  "else a device string such as 'cuda:1', a torch.device or a CUDA index")
    max_shard_size: object = option(None, "nograd.merge only: None keeps the MLLM's shard layout, else a size "
                                          "such as '5GB' or a positive number of bytes")

    def validate(self) -> None:
        if self.reasoning is None or not _is_source(self.reasoning):
            self.invalid("reasoning", "a loaded model or a path to a safetensors checkpoint folder", TypeError)
        if self.base is not None and not _is_source(self.base):
            self.invalid("base", "None, a loaded model or a path to a safetensors checkpoint folder", TypeError)
        for name in ("reasoning", "base"):
            if isinstance(getattr(self, name), str) and not getattr(self, name).strip():
                self.invalid(name, "a loaded model or a non-empty path to a safetensors checkpoint folder")
        if self.base is None and self.needs_base:
            need = f"rule={self.rule!r}" if self.rule != "frank" else f"coef={self.coef!r}"
            self.invalid("base", f"the common base model: {need} needs it (coef='prior', lambda_r=... or "
                                 "rule='linear' do not)")
        lam = self.lambda_r
        if lam is not None:
            values = list(lam) if isinstance(lam, (list, tuple)) else [lam]
            if not values or not all(is_number(v) and 0 <= v <= 1 for v in values):
                self.invalid("lambda_r", "None, a number in [0, 1], or a list of them (one per decoder layer)")
        w = self.weights
        if not (isinstance(w, (list, tuple)) and len(w) == 2 and all(is_number(x) for x in w)):
            self.invalid("weights", "(λ_V, λ_R): two finite numbers")
        object.__setattr__(self, "weights", tuple(float(x) for x in w))
        if not (is_number(self.density) and 0 < self.density <= 1):
            self.invalid("density", "a number in (0, 1]")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            self.invalid("seed", "an int")
        prior = self.prior
        if isinstance(prior, str):
            if prior not in PRIORS:
                self.invalid("prior", f"one of {', '.join(map(repr, PRIORS))} or a list of numbers in [0, 1]")
            if prior == "attention" and self.calibration is None:
                self.invalid("prior", "'exp' or a list when no calibration inputs are given (prior='attention' "
                                      "measures them)")
        elif not (isinstance(prior, (list, tuple)) and prior and all(is_number(p) and 0 <= p <= 1 for p in prior)):
            self.invalid("prior", f"one of {', '.join(map(repr, PRIORS))} or a list of numbers in [0, 1]")
        cal = self.calibration
        if cal is not None and not (isinstance(cal, Mapping) or (isinstance(cal, (list, tuple)) and cal
                                                                 and all(isinstance(c, Mapping) for c in cal))):
            self.invalid("calibration", "None, a dict of model inputs, or a non-empty list of such dicts", TypeError)
        if cal is not None and not all("input_ids" in c for c in ([cal] if isinstance(cal, Mapping) else cal)):
            self.invalid("calibration", "processor outputs (input_ids, attention_mask, pixel_values, ...): every "
                                        "calibration batch must hold input_ids")
        if not (is_number(self.prior_beta) and self.prior_beta >= 0):
            self.invalid("prior_beta", "a finite number >= 0")
        for name in ("max_calib_samples", "keep_shallow_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "max_calib_samples"
                                                                                 else 0):
                self.invalid(name, "an int >= 1" if name == "max_calib_samples" else "an int >= 0")
        layers = self.layers
        if layers is not None:
            ok = (isinstance(layers, (list, tuple)) and len(layers) == 2 and isinstance(layers[0], int)
                  and (layers[1] is None or isinstance(layers[1], int)) and layers[0] >= 0)
            if not ok:
                self.invalid("layers", "None or (start, end) with int start >= 0 and int-or-None end")
            object.__setattr__(self, "layers", tuple(layers))
        self.validate_device()
        self.validate_max_shard_size()
        self.refuse_unread()

    def refuse_unread(self) -> None:
        """An option set away from its default that this rule, coef and prior never read is refused (it was ignored
        silently: ``lambda_r`` under ties, ``calibration`` with ``prior='exp'``, ``weights`` under frank)."""
        source = self.prior_source() if self.needs_prior else None
        measured = "the measured prior (prior 'attention', or 'auto' with calibration)"
        readers = {
            "coef": (self.rule == "frank", "rule 'frank'"),
            "lambda_r": (self.rule in ("frank", "linear"), "rules 'frank' and 'linear'"),
            "weights": (self.rule in M.NEEDS_BASE, f"rules {', '.join(map(repr, M.NEEDS_BASE))}"),
            "density": (self.rule in ("ties", "dare_ties"), "rules 'ties' and 'dare_ties'"),
            "majority_sign_method": (self.rule in ("ties", "dare_ties"), "rules 'ties' and 'dare_ties'"),
            "seed": (self.rule == "dare_ties", "rule 'dare_ties'"),
            "prior": (source is not None, "rule 'frank' with coef 'frank' or 'prior' and no lambda_r"),
            "prior_beta": (source == "exp", "the data-free prior (prior 'exp', or 'auto' without calibration)"),
            **{name: (source == "attention", measured)
               for name in ("calibration", "prior_normalize", "query_tokens", "max_calib_samples")},
        }
        defaults = {f.name: f.default for f in fields(self)}
        for name, (read, by) in readers.items():
            value = getattr(self, name)
            if not read and (value is not None if defaults[name] is None else value != defaults[name]):
                needs = ", ".join(f"{key}={getattr(self, key)!r}" for key in ("rule", "coef", "lambda_r", "prior")
                                  if key != name)
                raise ValueError(f"frank: option {name} is read only by {by}, not with {needs}: leave it at its "
                                 f"default ({defaults[name]!r}) or choose what reads it")

    def validate_device(self) -> None:
        """``device``: None, a str that ``torch.device`` parses, a ``torch.device`` or a CUDA index (an int >= 0), of a
        device this machine has, and not "meta" (which holds no values). A bool, float or tensor would be taken by
        ``Tensor.to`` as a dtype cast, so they are refused."""
        device = self.device
        allowed = "None, a device string such as 'cpu', 'cuda' or 'cuda:1', a torch.device, or a CUDA index (int >= 0)"
        if device is None:
            return
        if is_int(device):
            if device < 0:
                self.invalid("device", allowed)
            object.__setattr__(self, "device", int(device))
        elif not isinstance(device, (str, torch.device)):
            self.invalid("device", allowed, TypeError)
        try:
            usable = torch.device(self.device).type != "meta"
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError):  # unparsable, or a device this machine lacks (torch says which)
            usable = False
        if not usable:
            self.invalid("device", f"{allowed}, of a device this machine has (not 'meta')")

    def validate_max_shard_size(self) -> None:
        """``max_shard_size``: None, a positive int of bytes or a size string such as '5GB'."""
        size = self.max_shard_size
        allowed = "None, a positive int (bytes) or a size such as '500MB' or '5GB'"
        if size is None:
            return
        if not (isinstance(size, str) or is_int(size)):
            self.invalid("max_shard_size", allowed, TypeError)
        try:
            ok = M.parse_size(size) > 0
        except (ValueError, OverflowError):
            ok = False
        if not ok:
            self.invalid("max_shard_size", allowed)

    @property
    def needs_base(self) -> bool:
        if self.rule in M.NEEDS_BASE:
            return True
        return self.rule == "frank" and self.lambda_r is None and self.coef in ("frank", "metagpt")

    @property
    def needs_prior(self) -> bool:
        return self.rule == "frank" and self.lambda_r is None and self.coef in ("frank", "prior")

    def prior_source(self) -> str:
        if not isinstance(self.prior, str):
            return "given"
        if self.prior == "auto":
            return "attention" if self.calibration is not None else "exp"
        return self.prior


# ---- step 1: the depth prior -----------------------------------------------------------------------------------------
class VisualShare(Intervention):
    """Read-out of one layer: the attention mass the chosen text queries give to image keys (no weights kept)."""

    observes = True

    def __init__(self, layer: int, state: dict):
        self.layer = layer
        self.state = state

    def observe(self, call: AttentionCall) -> None:
        queries, keys = self.state["queries"], self.state["keys"]
        b, _, m, n = call.shape
        if queries.shape != (b, m) or keys.shape != (b, n):
            return  # not the calibration prefill
        rows = queries.any(0).nonzero().flatten()
        if rows.numel() == 0:
            return
        attention = call.attention_rows(rows.to(call.query.device))  # (B, H, R, N)
        visual = keys.to(attention.device)[:, None, None, :]
        share = (attention.float() * visual).sum(-1).mean(1)  # (B, R): mean over heads
        chosen = queries[:, rows].to(share.device)
        self.state["mass"][self.layer] += float(share[chosen].double().sum())
        self.state["count"][self.layer] += int(chosen.sum())


def measure_visual_attention(model: nn.Module, adapter, calibration, *, query_tokens: str = "after_visual",
                             max_samples: int = 64) -> list[float]:
    """r_l per decoder layer: the share of attention that text queries give to image tokens, averaged over heads,
    queries and samples, on ``model`` as it is (read through nograd's attention path; nothing is changed)."""
    samples = [calibration] if isinstance(calibration, Mapping) else list(calibration)  # a BatchFeature too
    samples = samples[:max_samples]
    layers = adapter.num_layers
    state: dict[str, Any] = {"mass": [0.0] * layers, "count": [0] * layers}
    scratch = Handle(model, adapter, "frank-calibration", None)
    intervene(scratch, {module: VisualShare(i, state) for i, module in enumerate(adapter.attention_modules)})
    try:
        device = execution_device(model)
        for inputs in samples:
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            visual = adapter.visual_token_mask(ids) & real
            positions = torch.arange(ids.shape[1]).expand_as(ids)
            if query_tokens == "after_visual":
                last = torch.where(visual, positions, torch.full_like(positions, -1)).max(dim=1, keepdim=True).values
                queries = real & ~visual & (positions > last) & (last >= 0)
            else:
                queries = real & ~visual & visual.any(dim=1, keepdim=True)
            state["queries"], state["keys"] = queries, visual
            moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            with torch.inference_mode():
                model(**moved, use_cache=False)
    finally:
        scratch.remove()
    if any(c == 0 for c in state["count"]):
        raise ValueError("calibration: no text query after an image token was seen (each calibration input needs "
                         "image tokens followed by text)")
    return [mass / count for mass, count in zip(state["mass"], state["count"])]


def _solve_ac(e: torch.Tensor, y: torch.Tensor):
    """Non-negative least squares of y ≈ A·e + C per row of e (G, L): (A, C, sse), each (G,)."""
    n = y.numel()
    see, se, sey, sy = (e * e).sum(-1), e.sum(-1), (e * y).sum(-1), y.sum()
    det = see * n - se * se
    ok = det.abs() > 1e-12
    a_free = torch.where(ok, (sey * n - se * sy) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
    c_free = torch.where(ok, (see * sy - se * sey) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
    candidates = [(a_free, c_free, ok & (a_free >= 0) & (c_free >= 0)),
                  (torch.zeros_like(det), (sy / n).expand_as(det).clamp(min=0), torch.ones_like(ok)),
                  ((sey / see.clamp(min=1e-300)).clamp(min=0), torch.zeros_like(det), torch.ones_like(ok))]
    best_a, best_c = torch.zeros_like(det), torch.zeros_like(det)
    best = torch.full_like(det, math.inf)
    for a, c, feasible in candidates:
        sse = ((a[:, None] * e + c[:, None] - y) ** 2).sum(-1)
        better = feasible & (sse < best)
        best_a, best_c, best = torch.where(better, a, best_a), torch.where(better, c, best_c), torch.where(better, sse,
                                                                                                           best)
    return best_a, best_c, best


def fit_decay(r, *, beta_max: float = 30.0) -> dict:
    """Least-squares fit r̂(l) = A·exp(−β·x_l) + C, x_l = l/(L−1), A, β, C ≥ 0: a β grid (step 0.01) with the
    non-negative (A, C) in closed form, refined by golden-section search. Returns A, beta, C, r_fit, rmse."""
    y = torch.tensor([float(v) for v in r], dtype=torch.float64)
    depth = len(y)
    x = torch.arange(depth, dtype=torch.float64) / max(depth - 1, 1)
    grid = torch.linspace(0.0, beta_max, int(beta_max * 100) + 1, dtype=torch.float64)
    a, c, sse = _solve_ac(torch.exp(-grid[:, None] * x), y)
    k = int(torch.argmin(sse))

    def loss(beta):
        return float(_solve_ac(torch.exp(-torch.tensor([[beta]], dtype=torch.float64) * x), y)[2][0])

    lo, hi = float(grid[max(k - 1, 0)]), float(grid[min(k + 1, len(grid) - 1)])
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        m1, m2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if loss(m1) <= loss(m2):
            hi = m2
        else:
            lo = m1
    beta = (lo + hi) / 2
    if loss(beta) > float(sse[k]):
        beta = float(grid[k])
    e = torch.exp(-beta * x)[None]
    a, c, sse = _solve_ac(e, y)
    fit = (a[0] * e[0] + c[0]).tolist()
    return {"A": float(a[0]), "beta": beta, "C": float(c[0]), "r_fit": fit, "rmse": math.sqrt(float(sse[0]) / depth)}


def depth_prior(config: FrankConfig, num_layers: int, measured: list[float] | None = None) -> dict:
    """π_V per layer and how it was obtained: {"pi_v", "prior_source", "r", "r_fit", "beta", "fit_rmse"}."""
    source = config.prior_source()
    info: dict[str, Any] = {"prior_source": source, "r": measured, "r_fit": None, "beta": None, "fit_rmse": None}
    depth = max(num_layers - 1, 1)
    if source == "given":
        if len(config.prior) != num_layers:
            config.invalid("prior", f"a list of {num_layers} numbers in [0, 1] (one per decoder layer)")
        pi = [float(p) for p in config.prior]
    elif source == "exp":
        info["beta"] = float(config.prior_beta)
        pi = [math.exp(-config.prior_beta * layer / depth) for layer in range(num_layers)]
    else:
        fit = fit_decay(measured)
        info.update(r_fit=fit["r_fit"], beta=fit["beta"], fit_rmse=fit["rmse"])
        r_fit = fit["r_fit"]
        if config.prior_normalize == "first":
            pi = [min(max(v / r_fit[0], 0.0), 1.0) if r_fit[0] > 0 else 1.0 for v in r_fit]
        else:
            low, high = min(r_fit), max(r_fit)
            if high - low <= 1e-12 * max(abs(high), 1e-30):
                warnings.warn("frank: the fitted visual-attention share is flat over depth; using the data-free "
                              f"prior exp(-{config.prior_beta}·l/(L-1)) instead", stacklevel=3)
                info["prior_source"] = "exp (flat attention fit)"
                pi = [math.exp(-config.prior_beta * layer / depth) for layer in range(num_layers)]
            else:
                if high - low < WEAK_DECAY * high:
                    warnings.warn(f"frank: the fitted visual-attention share varies by only {(high - low) / high:.2%} "
                                  "over depth; min-max scaling still maps it to a full 1 -> 0 prior: check the "
                                  "calibration inputs (images and questions), or give prior='exp' or a list",
                                  stacklevel=3)
                pi = [(v - low) / (high - low) for v in r_fit]
    for layer in range(min(config.keep_shallow_layers, num_layers)):
        pi[layer] = 1.0
    info["pi_v"] = pi
    return info


# ---- step 2: the closed form ---------------------------------------------------------------------------------------
def coefficients(pi_v: float, a_v: float, a_r: float, coef: str = "frank") -> tuple[float, float]:
    """(λ_V, λ_R) of one layer. 'frank': π_V a_V / (π_V a_V + π_R a_R) (spec Eq. 15*); 'metagpt': a_V/(a_V + a_R)
    (Eq. 13*); 'prior': λ_V = π_V. 0/0 gives (1, 0); π_V = 1 gives exactly (1, 0), π_V = 0 (a_R > 0) exactly (0, 1)."""
    if coef == "prior":
        return float(pi_v), 1.0 - float(pi_v)
    if coef == "metagpt":
        pi_v = 0.5
    num = pi_v * a_v
    den = num + (1.0 - pi_v) * a_r
    if den <= 0:
        return 1.0, 0.0
    lam_v = num / den
    return lam_v, 1.0 - lam_v


# ---- the merge, shared by the in-place and the streamed path -------------------------------------------------------
def check_not_quantized(quantization_config, what: str) -> None:
    """Task vectors of packed (bitsandbytes / GPTQ / AWQ ...) weights mean nothing: refuse them (spec §5.5)."""
    if quantization_config:
        method = quantization_config.get("quant_method") if isinstance(quantization_config, dict) else \
            getattr(quantization_config, "quant_method", quantization_config)
        raise ValueError(f"frank: {what} is quantized ({method}); merge the unquantized weights and quantize the "
                         "result")


def merge_layers(config: FrankConfig, num_layers: int) -> list[int]:
    """The decoder layers the rule may change: ``layers`` minus the first ``keep_shallow_layers``."""
    start, end = config.layers if config.layers is not None else (0, None)
    end = num_layers if end is None else end
    if not 0 <= start < end <= num_layers:
        config.invalid("layers", f"(start, end) with 0 <= start < end <= {num_layers} (end None = {num_layers})")
    if config.keep_shallow_layers > num_layers:
        config.invalid("keep_shallow_layers", f"an int in 0..{num_layers} (the decoder's layers; {num_layers} keeps "
                                              "them all)")
    return [layer for layer in range(start, end) if layer >= config.keep_shallow_layers]


def plan_merge(config: FrankConfig, dst: M.Side, reasoning: M.Side, base: M.Side | None) -> M.Plan:
    policy = config.non_layer_policy
    roles = []
    if policy != "mllm":
        roles = [r for r in M.ROLES if not (r == "lm_head" and _lm_head_tied(dst))]
    sources = [reasoning] + ([base] if base is not None else [])
    if policy == "merge":
        _check_added_tokens(dst, sources)
    layers = merge_layers(config, dst.num_layers)
    plan = M.make_plan(dst, sources, layers, roles)
    if policy != "mllm" and _lm_head_tied(dst) and not _lm_head_tied(reasoning):
        which = "the reasoning model's" if policy == "reasoning" else "the merged"
        plan.warnings.append("the mllm ties lm_head to its embeddings but the reasoning model has its own lm_head: "
                             f"the merged model uses {which} embeddings as its lm_head")
    return plan


def _check_added_tokens(dst: M.Side, sources: list[M.Side]) -> None:
    """``non_layer_policy="merge"`` adds rows of two embedding tables: the same id must be the same token in both
    (spec §1.3). Checked where both tokenizers are known (checkpoint folders); a loaded model has none to compare."""
    mine = dst.added_tokens()
    for src in sources:
        theirs = src.added_tokens()
        if mine and theirs and mine != theirs:
            differ = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda item: item[1])
            raise ValueError(f"non_layer_policy='merge' needs identical added-token tables, but the mllm's and the "
                             f"{src.what} model's differ: {', '.join(f'{t!r} (id {i})' for t, i in differ[:5])}; "
                             "use non_layer_policy='mllm' (the default) or 'reasoning'")


def _lm_head_tied(side: M.Side) -> bool:
    if isinstance(side, M.ModelSide):
        return side.lm_head_tied()
    return side.role_name("lm_head") is None


def compute_coefficients(config: FrankConfig, plan: M.Plan, dst: M.Side, reasoning: M.Side, base: M.Side | None,
                         prior: dict | None, device=None) -> dict:
    """Per-layer (λ_V, λ_R) and the statistics behind them (lists over all L layers; None where not computed)."""
    depth = dst.num_layers
    report: dict[str, Any] = {"a_v": [None] * depth, "a_r": [None] * depth, "cos": [None] * depth,
                              "lambda_v": [1.0] * depth, "lambda_r": [0.0] * depth}
    lam = config.lambda_r
    manual = None if lam is None else ([float(lam)] * depth if is_number(lam) else [float(v) for v in lam])
    if manual is not None and len(manual) != depth:
        config.invalid("lambda_r", f"a number in [0, 1] or a list of {depth} of them (one per decoder layer)")
    for layer in plan.layers:
        if base is not None and (config.needs_base or config.rule == "frank"):
            def triples(layer=layer):
                for suffix in plan.suffixes[layer]:
                    v = dst.read(layer, suffix)
                    v = v.to(device) if device is not None else v
                    yield v, reasoning.read(layer, suffix), base.read(layer, suffix)

            a_v, a_r, cos = M.layer_stats(triples())
            report["a_v"][layer], report["a_r"][layer], report["cos"][layer] = a_v, a_r, cos
        if config.rule == "frank":
            if manual is not None:
                lam_v, lam_r = 1.0 - manual[layer], manual[layer]
            else:
                pi = prior["pi_v"][layer] if prior is not None else 0.5
                lam_v, lam_r = coefficients(pi, report["a_v"][layer] or 0.0, report["a_r"][layer] or 0.0, config.coef)
        elif config.rule == "linear":
            lam_r = 0.5 if manual is None else manual[layer]
            lam_v = 1.0 - lam_r
        else:
            lam_v, lam_r = config.weights
        report["lambda_v"][layer], report["lambda_r"][layer] = lam_v, lam_r
    return report


def _warn_all(messages: list[str]) -> None:
    for message in messages:
        warnings.warn(f"frank: {message}", stacklevel=4)


def _cos_warnings(report: dict) -> list[str]:
    high = [i for i, c in enumerate(report["cos"]) if c is not None and abs(c) > 0.2]
    if not high:
        return []
    return [f"task vectors are far from orthogonal (|cos| > 0.2) in layers {high}: the closed form assumes "
            "near-orthogonal τ_V, τ_R; check that `base` is the common ancestor"]


def _changes(config: FrankConfig, plan: M.Plan, report: dict) -> list[int]:
    if config.rule in M.SUM_TO_ONE:
        return [layer for layer in plan.layers if report["lambda_r"][layer] != 0]
    return list(plan.layers)


def _combine(config, layer, suffix, v, r, b, report):
    return M.combine(config.rule, v, r, b, report["lambda_v"][layer], report["lambda_r"][layer],
                     density=config.density, majority_sign_method=config.majority_sign_method,
                     seed=M.tensor_seed(config.seed, layer, suffix))


def role_value(config: FrankConfig, role: str, dst: M.Side, reasoning: M.Side, base: M.Side | None, report: dict,
               changed, device=None) -> torch.Tensor | None:
    """The new value of the non-layer tensor ``role``, or None where it stays the MLLM's: the reasoning LLM's
    (``"reasoning"``), or the MLLM's and the reasoning LLM's combined by the rule with the coefficients of the
    decoder layer ``ROLE_DEPTH`` names (``"merge"``; kept where that layer keeps the MLLM's)."""
    if config.non_layer_policy == "reasoning":
        return reasoning.read_role(role)
    layer = ROLE_DEPTH[role] % len(report["lambda_r"])
    if layer not in changed:
        return None
    v = dst.read_role(role)
    b = base.read_role(role) if config.rule in M.NEEDS_BASE else None
    return _combine(config, layer, role, v.to(device) if device is not None else v, reasoning.read_role(role), b,
                    report)


def _finish(config: FrankConfig, plan: M.Plan, report: dict, prior: dict | None, changed: list[int],
            roles: list[str]) -> dict:
    warned = plan.warnings + _cos_warnings(report)
    report.update(rule=config.rule, coef=config.coef if config.rule == "frank" else None,
                  layers=changed, kept_layers=[i for i in range(len(report["lambda_r"])) if i not in changed],
                  tensors_merged=sum(len(plan.suffixes[i]) for i in changed) + len(roles),
                  non_layer=roles, mismatches=list(plan.warnings), warnings=warned)
    report.update({k: None for k in ("prior_source", "r", "r_fit", "pi_v", "beta", "fit_rmse")})
    if prior is not None:
        report.update(prior)
    return report


@register
class Frank(Method):
    name = "frank"
    summary = ("merge a reasoning LLM into a multimodal LLM layer by layer, shallow layers kept visual, deep layers "
               "reasoning (closed-form coefficients weighted by a visual-attention depth prior)")
    paper = "Training-Free Reasoning and Reflection in MLLMs"
    arxiv = "2505.16151"
    kinds = ("vlm", "text")
    resources = ("weights",)
    Config = FrankConfig

    def check_model(self) -> None:
        check_not_quantized(getattr(self.adapter.model.config, "quantization_config", None), "the mllm")
        depth = self.adapter.num_layers
        merge_layers(self.config, depth)
        if not isinstance(self.config.prior, str) and len(self.config.prior) != depth:
            self.config.invalid("prior", f"a list of {depth} numbers in [0, 1] (one per decoder layer)")
        if self.config.prior_source() == "attention" and self.adapter.kind != "vlm":
            self.config.invalid("prior", "'exp' or a list: 'attention' measures image attention, which needs a VLM")
        if self.config.needs_prior and self.config.prior_source() == "attention":
            from ..errors import IncompatibleMethodsError
            from ..handle import attached

            others = [h.method for h in attached(self.adapter.model)]
            if others:
                raise IncompatibleMethodsError(
                    f"frank measures its depth prior on the unmodified model, but {', '.join(others)} is attached: "
                    "apply frank first, or give a data-free prior (prior='exp' or a list)")

    def attach(self, handle) -> None:
        config = self.config
        model = handle.model
        dst = M.ModelSide(model, "mllm", decoder=self.adapter.text_model)
        reasoning = M.side_of(config.reasoning, "reasoning")
        base = M.side_of(config.base, "base")
        plan = plan_merge(config, dst, reasoning, base)  # every mapping and shape checked before any change
        prior = None
        if config.needs_prior:
            measured = None
            if config.prior_source() == "attention":
                measured = measure_visual_attention(model, self.adapter, config.calibration,
                                                    query_tokens=config.query_tokens,
                                                    max_samples=config.max_calib_samples)
            prior = depth_prior(config, dst.num_layers, measured)
        device = config.device
        report = compute_coefficients(config, plan, dst, reasoning, base, prior, device)
        changed = _changes(config, plan, report)
        undo: list = []

        def restore():
            while undo:
                undo.pop()()

        handle.on_remove(f"weights of {len(changed)} decoder layers", restore)
        needs_b = config.rule in M.NEEDS_BASE
        with torch.no_grad():
            for layer in changed:
                for suffix in plan.suffixes[layer]:
                    v = dst.read(layer, suffix)
                    v = v.to(device) if device is not None else v
                    b = base.read(layer, suffix) if needs_b else None
                    merged = _combine(config, layer, suffix, v, reasoning.read(layer, suffix), b, report)
                    if merged is not None:
                        dst.write(layer, suffix, merged, undo)
                    del merged, v, b
            roles = []
            for role in plan.roles:
                value = role_value(config, role, dst, reasoning, base, report, changed, device)
                if value is not None:
                    dst.write_role(role, value, undo)
                    roles.append(role)
        handle.stats.update(_finish(config, plan, report, prior, changed, roles))
        _warn_all(handle.stats["warnings"])

    @classmethod
    def stream(cls, mllm, out, config: FrankConfig) -> dict:
        """``nograd.merge("frank", ...)``: the same merge from the MLLM checkpoint folder ``mllm`` into ``out``."""
        dst = M.CheckpointSide(mllm, "mllm")
        reasoning = M.side_of(config.reasoning, "reasoning")
        base = M.side_of(config.base, "base")
        check_not_quantized(dst.ckpt.read_json("config.json").get("quantization_config"), "the mllm checkpoint")
        merge_layers(config, dst.num_layers)
        if config.needs_prior and config.prior_source() == "attention":
            config.invalid("prior", "'exp' or a list of numbers for a streamed merge: measuring the attention prior "
                                    "needs the loaded MLLM (run nograd.apply on it, or pass prior=h.stats['pi_v'] "
                                    "or nograd.methods.frank.attention_prior(model, calibration))")
        plan = plan_merge(config, dst, reasoning, base)
        prior = depth_prior(config, dst.num_layers) if config.needs_prior else None
        device = torch.device(config.device) if config.device is not None else torch.device("cpu")
        report = compute_coefficients(config, plan, dst, reasoning, base, prior, device)
        changed = set(_changes(config, plan, report))
        roles = {dst.role_name(role): role for role in plan.roles if dst.role_name(role) is not None}
        merged_roles = []
        needs_b = config.rule in M.NEEDS_BASE

        def produce(key):
            found = dst.layer_key(key)
            if found is not None and found[0] in changed:
                layer, suffix = found
                v = dst.ckpt.get(key)
                b = base.read(layer, suffix) if needs_b else None
                merged = _combine(config, layer, suffix, v.to(device), reasoning.read(layer, suffix), b, report)
                return None if merged is None else merged.to("cpu", v.dtype)
            if key in roles:
                value = role_value(config, roles[key], dst, reasoning, base, report, changed, device)
                if value is not None:
                    merged_roles.append(roles[key])
                    return value.to("cpu", M.DTYPES[dst.ckpt.dtype_name(key)])
            return None

        with torch.no_grad():
            written = M.stream_merge(dst, out, produce, max_shard_size=config.max_shard_size)
        result = _finish(config, plan, report, prior, sorted(changed), [r for r in plan.roles if r in merged_roles])
        result.update(out=str(out), **written)
        _warn_all(result["warnings"])
        return result


def attention_prior(model, calibration, **options) -> dict:
    """The depth prior of a loaded MLLM measured on ``calibration`` (``prior``-related FRANK options allowed), for a
    streamed merge: ``nograd.merge("frank", ..., prior=attention_prior(model, batches)["pi_v"])``."""
    from ..patches import adapter_for

    config = FrankConfig.from_options({"reasoning": "unused", "rule": "frank", "coef": "prior",
                                       "calibration": calibration, "prior": "attention", **options})
    adapter = adapter_for(model)
    measured = measure_visual_attention(model, adapter, calibration, query_tokens=config.query_tokens,
                                        max_samples=config.max_calib_samples)
    return depth_prior(config, adapter.num_layers, measured)
