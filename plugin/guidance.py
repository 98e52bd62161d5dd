"""Perturbed-branch guidance around a diffusers DiT, with the user's pipeline code unchanged.

PAG-style methods (PAG, SoftPAG, HeadHunter; spec ``headhunter.md`` §1.4, §5.5) need, at every denoising step, the
transformer's prediction with a perturbed attention (``eps_ptb``) next to the conditional one, and the guided
prediction ``eps_uncond + g (eps_cond - eps_uncond) + w (eps_cond - eps_ptb)`` (paper Eq. 5 in the diffusers
convention, as ``PAGMixin._apply_perturbed_attention_guidance`` and the official HeadHunter pipeline compute it).

``PerturbedGuidance`` does this with a forward pre-hook / forward hook pair on the transformer:

1. Pre-hook: find the conditional rows of the incoming batch (diffusers orders a CFG batch ``[uncond, cond]``, so
   the last ``n/2`` rows; every row when CFG is off, FLUX's distilled guidance included) and append a copy of them to
   every batched input (``hidden_states``, ``encoder_hidden_states``, ``pooled_projections``, ``timestep``,
   ``guidance``); ``state.ptb`` names the appended rows, which the attention interventions perturb.
   With ``batch=False`` nothing is appended: the forward hook runs a second call on the conditional rows instead.
   **Late fork** (spec §5.5; ``fork`` given): the perturbed rows equal the conditional rows until the first perturbed
   block, so the copy is appended there instead: pre-hooks on the ``fork`` modules (the blocks from the first
   perturbed one on, and ``norm_out``, which reads ``temb``) append the conditional rows to every tensor argument
   that still has the call's ``n`` rows. Earlier blocks run at the plain batch size. A call with ControlNet
   residuals (added by the transformer between its blocks) forks at the input, its residual lists grown too.
2. Forward hook: fold the perturbation term into the conditional rows so the pipeline's own formula gives the right
   result, ``cond' = cond + (w / g) (cond - ptb)`` (``g`` = the pipeline's CFG scale, or FLUX's ``true_cfg_scale``;
   1 without CFG), and return the original ``n`` rows.

Calls that must not be perturbed pass through untouched: SD3's skip-layer-guidance call (``skip_layers=``), FLUX's
true-CFG call of the negative prompt, steps outside the ``[start, stop)`` window (step index from the
pipeline's scheduler, counted from its ``begin_index`` as img2img starts later) and nograd's own forwards inside
``suspended()`` (RefAM's read-out pass). SD3's skip-layer guidance adds ``s (cond - skip)`` with the pipeline's
conditional prediction, which carries the fold: the skip-layer call that follows a folded call gets the same shift,
so the term stays ``s (cond - skip)``. The pipeline whose CFG settings count is the one running the transformer
(found on the call stack: several pipelines may share one transformer); a call with no pipeline running it is a
bare call (every row conditional, every call in the window), also after a pipeline has run (its finished call's
CFG scale and scheduler position are not this call's).
Everything installed is recorded on the handle and removed by ``handle.remove()``.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from .forward_inputs import bound_inputs, checkpointing
from .row_flops import ExtraRowFlops

BATCHED_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
"""Transformer inputs with a batch axis (SD3 and FLUX); ``txt_ids`` / ``img_ids`` are unbatched (S, 3)."""
RESIDUAL_INPUTS = ("block_controlnet_hidden_states", "controlnet_block_samples", "controlnet_single_block_samples")
"""ControlNet residuals (lists of batched tensors) that the transformer adds between its blocks (SD3, FLUX): they
take the perturbed rows at the input, so a call that has them is not late-forked."""


def _batched(bound: dict, n: int, rows) -> dict:
    """``bound`` with ``rows(tensor)`` applied to every batched input of ``n`` rows (ControlNet residual lists too)."""
    out = dict(bound)
    for name in BATCHED_INPUTS:
        value = bound.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[name] = rows(value)
    for name in RESIDUAL_INPUTS:
        value = bound.get(name)
        if isinstance(value, (list, tuple)):
            out[name] = type(value)(rows(t) if isinstance(t, torch.Tensor) and t.shape[0] == n else t for t in value)
    return out


@dataclass
class GuidanceState:
    """Per forward pass: which rows of the current transformer call run perturbed (None: no row)."""

    ptb: slice | None = None
    row_weights: torch.Tensor | None = None
    """Optional per-perturbed-row head weights (R, L, H) (the search's candidate batching); None: the method's."""
    perturb_only: bool = False
    """Every row of every call runs perturbed and no guidance is folded (``handle.perturbed_only()``)."""


@dataclass
class _Frame:
    n: int
    cond: slice
    factor: float
    batched: bool
    kwargs: dict = field(default_factory=dict)


@dataclass
class _Shift:
    """SD3's skip-layer call after a folded call: its output gets the fold's shift ``(w / g) (cond - ptb)``."""

    delta: torch.Tensor


_SUSPENDED = contextvars.ContextVar("nograd_guidance_suspended", default=False)


@contextlib.contextmanager
def suspended():
    """Within the block no ``PerturbedGuidance`` perturbs or folds anything: the transformer runs as without it
    (nograd's own read-out forwards, e.g. RefAM's, under a guidance method attached to the same model)."""
    token = _SUSPENDED.set(True)
    try:
        yield
    finally:
        _SUSPENDED.reset(token)


def _is_pipeline(obj) -> bool:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, DiffusionPipeline)


def _caller_locals(depth: int = 24):
    """The local variables of the calling frames, innermost first (at most ``depth``)."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return
        yield frame.f_locals
        frame = frame.f_back


def _running_pipeline(model: nn.Module):
    """The diffusers pipeline whose ``__call__`` is running ``model`` now (found on the call stack), else None."""
    for local in _caller_locals():
        owner = local.get("self")
        if getattr(owner, "transformer", None) is model and _is_pipeline(owner):
            return owner
    return None


_TRUE_CFG_INPUTS = {"encoder_hidden_states": "prompt_embeds", "pooled_projections": "pooled_prompt_embeds"}
"""The transformer inputs that tell FLUX's true-CFG calls apart, and the pipeline locals (``negative_`` + the name for
the negative prompt's call) they are given."""


def _true_cfg(pipe, bound: dict) -> tuple[float, str] | None:
    """FLUX's true CFG in the running pipeline ``__call__``: ``(true_cfg_scale, which)``, ``which`` saying whether the
    call ``bound`` is the prompt's, the negative prompt's, or "both" (the two are given the same embedding objects, so
    the calls are one), from the pipeline's locals (it keeps them nowhere else), read from the caller frames; None
    when true CFG is off."""
    for local in _caller_locals():
        if local.get("self") is pipe and "true_cfg_scale" in local:
            if not local.get("do_true_cfg"):
                return None
            given = {name: (bound.get(name), local.get(key), local.get("negative_" + key))
                     for name, key in _TRUE_CFG_INPUTS.items() if local.get("negative_" + key) is not None}
            negative = bool(given) and all(value is neg for value, _, neg in given.values())
            positive = all(value is pos for value, pos, _ in given.values())
            which = ("both" if positive else "negative") if negative else "prompt"
            return float(local["true_cfg_scale"]), which
    return None


class PerturbedGuidance:
    """The hook pair on one transformer (see the module doc). ``stats`` is the handle's stats dict."""

    def __init__(self, model: nn.Module, scale: float, *, batch: bool = True, start: float = 0.0, stop: float = 1.0,
                 stats: dict | None = None, fork: list[nn.Module] | None = None):
        self.model = model
        self.scale = float(scale)
        self.batch = batch
        self.start, self.stop = start, stop
        self.state = GuidanceState()
        self.stats = stats if stats is not None else {}
        self.stats.setdefault("perturbed_calls", 0)
        self.stats.setdefault("perturbed_rows", 0)
        self.stats.setdefault("extra_flops", 0)
        self._signature = inspect.signature(model.forward)
        self._frames: list[_Frame | None] = []
        self._inner = False
        self._context: str | None = None
        self.fork = fork if batch else None
        self._forking: tuple[int, slice] | None = None
        """(n, conditional rows) while a late-forked call runs."""
        self._fold: torch.Tensor | None = None
        """The shift the last folded call gave its conditional rows (for SD3's skip-layer call that follows)."""
        self._flops = ExtraRowFlops(model)

    # ---- install / remove --------------------------------------------------------------------------------------
    def install(self, handle) -> None:
        pre = self.model.register_forward_pre_hook(self._pre, with_kwargs=True)
        post = self.model.register_forward_hook(self._post, with_kwargs=True, always_call=True)
        handle.on_remove("perturbed-guidance hooks on the transformer", lambda: (post.remove(), pre.remove()))
        if self.fork:
            hooks = [m.register_forward_pre_hook(self._grow, with_kwargs=True) for m in self.fork]
            handle.on_remove(f"late-fork hooks on {len(hooks)} modules", lambda: [h.remove() for h in hooks])
        if hasattr(self.model, "cache_context"):
            had = "cache_context" in self.model.__dict__
            previous = self.model.__dict__.get("cache_context")
            original = self.model.cache_context

            @contextlib.contextmanager
            def cache_context(name, **kwargs):
                outer, self._context = self._context, name
                try:
                    with original(name, **kwargs):
                        yield
                finally:
                    self._context = outer

            self.model.cache_context = cache_context

            def restore():
                if had:
                    self.model.cache_context = previous
                else:
                    del self.model.cache_context

            handle.on_remove("cache_context wrapper (FLUX true-CFG calls)", restore)

    @contextlib.contextmanager
    def perturbed_only(self):
        """Within the block every transformer call returns the perturbed prediction of every row (no guidance)."""
        outer, self.state.perturb_only = self.state.perturb_only, True
        try:
            yield
        finally:
            self.state.perturb_only = outer

    # ---- per call -----------------------------------------------------------------------------------------------
    def _in_window(self, pipe) -> bool:
        if self.start <= 0.0 and self.stop >= 1.0:
            return True
        total = getattr(pipe, "_num_timesteps", None) if pipe is not None else None
        if not total:
            return self.start < self.stop
        scheduler = pipe.scheduler
        index = getattr(scheduler, "step_index", None)  # None until the first scheduler step
        step = 0 if index is None else index - (getattr(scheduler, "begin_index", None) or 0)
        return self.start <= step / total < self.stop

    def _guidance_rows(self, n: int, pipe, bound: dict) -> tuple[slice, float] | None:
        """(conditional rows, fold factor w / g) for a call of ``n`` rows, or None if it must not be perturbed.

        FLUX's true CFG calls the transformer twice a step; the negative prompt's call is left alone. ``FluxPipeline``
        names it (``cache_context("uncond")``); its img2img, inpaint, Kontext and ControlNet siblings do not, and it
        is the call given the pipeline's negative embeddings. Given the same objects for both prompts, the two calls
        are one: each perturbed by ``w`` unfolded gives ``cond + w (cond - ptb)`` too."""
        if self._context == "uncond":
            return None
        if pipe is not None and getattr(pipe, "do_classifier_free_guidance", False):
            g = float(pipe.guidance_scale)
            if n % 2 or abs(g) < 1e-8:
                return None
            return slice(n // 2, n), self.scale / g
        true_cfg = _true_cfg(pipe, bound) if pipe is not None else None
        if true_cfg is not None:
            true_cfg_scale, which = true_cfg
            if self._context is None and which == "negative":
                return None
            if abs(true_cfg_scale) > 1e-8 and (self._context is not None or which == "prompt"):
                return slice(0, n), self.scale / true_cfg_scale
        return slice(0, n), self.scale

    def _pre(self, module, args, kwargs):
        if self._inner:  # the perturbed-only second call of batch=False
            self._frames.append(None)
            self.state.ptb = slice(0, self._batch_of(kwargs))
            return None
        # a new outer call: nothing of an earlier one is pending (an interrupt skips the forward hook's clean-up)
        self._frames.clear()
        self.state.ptb, self._forking = None, None
        fold, self._fold = self._fold, None
        if _SUSPENDED.get():
            self._frames.append(None)
            return None
        bound = self._bind(args, kwargs)
        n = self._batch_of(bound)
        if self.state.perturb_only:
            self._refuse_checkpointing()
            self._frames.append(None)
            self.state.ptb = slice(0, n)
            return None
        if bound.get("skip_layers") is not None:
            self._frames.append(_Shift(fold) if fold is not None and fold.shape[0] == n else None)
            return None
        pipe = _running_pipeline(self.model)
        rows = self._guidance_rows(n, pipe, bound) if self._in_window(pipe) else None
        if rows is None:
            self._frames.append(None)
            return None
        self._refuse_checkpointing()
        cond, factor = rows
        if self.batch:
            self._frames.append(_Frame(n, cond, factor, True))
            self.state.ptb = slice(n, n + cond.stop - cond.start)
            late = self.fork is not None and all(bound.get(name) is None for name in RESIDUAL_INPUTS)
            self._flops.plain = n
            self._count(bound, cond, "late" if late else "input")
            if late:
                self._forking = (n, cond)
                return None
            return (), _batched(bound, n, lambda value: torch.cat([value, value[cond]], dim=0))
        self._frames.append(_Frame(n, cond, factor, False, _batched(bound, n, lambda value: value[cond])))
        self._flops.plain = n
        self._count(bound, cond, "separate")
        return None

    def _refuse_checkpointing(self) -> None:
        """Gradient checkpointing re-runs the blocks in the backward pass, after this call's perturbed rows and their
        late fork are gone: the recomputation would not be the forward (a ``CheckpointError``, or gradients of
        another function)."""
        if torch.is_grad_enabled() and checkpointing(self.model):
            raise NotImplementedError(
                f"perturbed-attention guidance does not run under gradient checkpointing: call "
                f"{type(self.model).__name__} under torch.no_grad() or disable_gradient_checkpointing() first")

    def _grow(self, module, args, kwargs):
        """Late fork: append the conditional rows to every tensor argument that still has the call's ``n`` rows."""
        if self._forking is None:
            return None
        n, cond = self._forking

        def grow(value):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
                return torch.cat([value, value[cond]], dim=0)
            return value

        return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}

    def _post(self, module, args, kwargs, output):
        frame = self._frames.pop() if self._frames else None
        self.state.ptb = None
        self._forking = None
        if output is None:  # the call raised
            self._flops.abandon()
        if frame is None or output is None:
            return None
        sample = output[0] if isinstance(output, tuple) else output.sample
        if isinstance(frame, _Shift):
            return self._with_sample(output, sample + frame.delta.to(sample.dtype))
        if frame.batched:
            # a late fork whose blocks were all skipped never grew the batch: the perturbed rows are the cond rows
            ptb = sample[frame.n:] if sample.shape[0] > frame.n else sample[frame.cond]
        else:
            self._inner, self._flops.plain = True, 0
            try:
                result = module(**frame.kwargs)
            finally:
                self._inner = False
            ptb = result[0] if isinstance(result, tuple) else result.sample
        self._flops.finish(self.stats)
        guided = sample[: frame.n].clone()
        cond = sample[frame.cond]
        self._fold = frame.factor * (cond - ptb)
        guided[frame.cond] = cond + self._fold
        return self._with_sample(output, guided)

    @staticmethod
    def _with_sample(output, sample: torch.Tensor):
        """The transformer's output (tuple or output class) with ``sample`` in place of its prediction."""
        return (sample, *output[1:]) if isinstance(output, tuple) else type(output)(sample=sample)

    # ---- bookkeeping ---------------------------------------------------------------------------------------------
    def _bind(self, args, kwargs) -> dict:
        return bound_inputs(self._signature, args, kwargs)

    @staticmethod
    def _batch_of(bound: dict) -> int:
        return int(bound["hidden_states"].shape[0])

    def _count(self, bound: dict, cond: slice, how: str) -> None:
        """Count a perturbed call; ``how`` the extra rows join: "late" (at the fork block), "input" or "separate"."""
        rows = cond.stop - cond.start
        text = bound.get("encoder_hidden_states")
        shape = (how, tuple(bound["hidden_states"].shape[1:]), tuple(getattr(text, "shape", ())[1:]))
        self.stats["perturbed_calls"] += 1
        self.stats["perturbed_rows"] += rows
        self._flops.count(shape, rows, self.stats)
