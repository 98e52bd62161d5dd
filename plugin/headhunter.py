"""HeadHunter: iterative greedy search for the attention heads to perturb, and the head sets it produces.

Ahn et al., *Fine-Grained Perturbation Guidance via Attention Head Selection*, NeurIPS 2025, arXiv 2506.10978,
Algorithm 1; official code ``cvlab-kaist/HeadHunter`` ``pipeline_distributed.py`` (spec ``headhunter.md`` §1.6):

1. ``S = {}``, ``pool = every (layer, head)``.
2. For each of R rounds: score every head h of the pool by the mean reward of the M images generated from the
   prompt-seed pairs with perturbation guidance on ``S + {h}``; add the k best to S (and take them out of the pool).
3. Return S in selection order (round by round, within a round by score).

Search settings of the official code (the defaults here): u = 1 (PAG, hard-coded ``@scale=1.0``), w = 3 on SD3
(8 on FLUX, ``run_flux.sh``), CFG off (``guidance_scale=0.0``), seeds = prompt index, k = 3 and R = 5 (the style
setting, ``run.sh``; the paper's general-quality setting is k = 24, R = 1, of which the top 9 are used with u = 0.5).
Ours: ties break deterministically (score descending, then (layer, head) ascending; the code's order came from an
all-gather); candidates are batched (c candidates of one prompt-seed pair share one pipeline call, each perturbed
row with its own head set: exact up to batch-size float noise); progress is saved to a JSON head-set file after
every batch, and a later call with the same file resumes. Use: ``nograd.apply(pipe, "headhunter", heads=path)``.

The paper publishes no head files; ``PAPER_EXAMPLE_HEADS`` holds only the single heads its figures name (spec
§3.3), as illustrations, not tuned presets.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch

from .config import is_int, is_number

FORMAT = "nograd.headset/1"

PAPER_EXAMPLE_HEADS: dict[str, dict] = {
    "sd3-medium": {
        "model": {"model_class": "SD3Transformer2DModel", "num_layers": 24, "num_heads": 24, "head_dim": 64},
        "note": "single heads named in the paper's figures (arXiv 2506.10978 v4, Figs. 3, 8, 21, 32, 34, 36); "
                "illustrative, unverified, not tuned presets; layer = transformer_blocks index",
        "heads": {
            "shearing": [(11, 15)],
            "darkness": [(1, 10)],
            "shadow": [(13, 17)],
            "blue_tone": [(0, 23)],
            "red": [(0, 3)],
            "horizontal_banding": [(16, 3)],
            "sunlight": [(0, 4)],
            "fine_detail": [(14, 7)],
            "rainbow_neon": [(14, 17)],
            "dark": [(1, 2), (1, 10)],
            "white": [(0, 15), (1, 19)],
            "golden_hour_round3": [(18, 11), (0, 17), (2, 3)],
        },
    },
    "flux.1-dev": {
        "model": {"model_class": "FluxTransformer2DModel", "num_layers": 57, "num_heads": 24, "head_dim": 128},
        "note": "single heads named in the paper's figures; illustrative, unverified (the official FLUX code is not "
                "published); layer = 0..18 dual-stream blocks, 19..56 single-stream blocks (assumed)",
        "heads": {
            "golden_hour": [(38, 18)],
            "green_filter": [(52, 12)],
            "glossy_plastic": [(43, 17)],
            "smooth_bokeh": [(34, 0)],
            "cool_tone": [(52, 6)],
            "warm_red": [(52, 22)],
        },
    },
}


# ---- head sets -------------------------------------------------------------------------------------------------------
@dataclass
class HeadSet:
    """An ordered set of (layer, head) pairs and where it came from. ``heads`` is in selection order."""

    heads: list
    model_class: str | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    rounds: list = field(default_factory=list)
    """The heads each round added, in score order."""
    scores: list = field(default_factory=list)
    """Per round, ``{"layer,head": mean reward}`` of every candidate scored."""
    config: dict = field(default_factory=dict)
    note: str = ""
    complete: bool = True
    pending: dict = field(default_factory=dict)
    """Scores of the round in progress (an interrupted or budget-limited search), for resuming."""

    def __post_init__(self):
        self.heads = [tuple(int(x) for x in pair) for pair in self.heads]
        self.rounds = [[tuple(int(x) for x in pair) for pair in chosen] for chosen in self.rounds]

    def top(self, n: int) -> "HeadSet":
        """The first ``n`` heads (the paper's top-k prefixes)."""
        return HeadSet(self.heads[:n], self.model_class, self.num_layers, self.num_heads, self.head_dim,
                       note=f"top {n} of: {self.note}".strip(), config=dict(self.config))

    def check(self, adapter) -> None:
        """Raise ``ValueError`` if the set was made for a model of another class or shape."""
        model = adapter.model
        found = (type(model).__name__, len(adapter.decoder_layers), adapter.num_heads, adapter.head_dim)
        wanted = (self.model_class, self.num_layers, self.num_heads, self.head_dim)
        for have, want, what in zip(found, wanted, ("model class", "layers", "heads per layer", "head dim")):
            if want is not None and have != want:
                raise ValueError(f"heads: this head set was made for {self.model_class} with {self.num_layers} layers "
                                 f"x {self.num_heads} heads (head dim {self.head_dim}); the model is {found[0]} with "
                                 f"{found[1]} layers x {found[2]} heads (head dim {found[3]}): the {what} differs")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["heads"] = [list(p) for p in self.heads]
        data["rounds"] = [[list(p) for p in chosen] for chosen in self.rounds]
        return {"format": FORMAT, **data}

    @classmethod
    def from_dict(cls, data: dict) -> "HeadSet":
        if not isinstance(data, dict):
            raise ValueError(f"heads: not a nograd head set (a JSON {type(data).__name__}, expected an object with "
                             f"format {FORMAT!r}; a list of (layer, head) pairs goes to heads= directly)")
        if data.get("format") != FORMAT:
            raise ValueError(f"heads: not a nograd head set (format {data.get('format')!r}, expected {FORMAT!r})")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path) -> None:
        """Write the set as JSON (atomically: a temporary file, then a rename)."""
        path = os.fspath(path)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "HeadSet":
        with open(os.fspath(path)) as f:
            return cls.from_dict(json.load(f))


def paper_example(name: str) -> HeadSet:
    """``"<model>/<name>"`` from ``PAPER_EXAMPLE_HEADS`` (e.g. ``"sd3-medium/darkness"``) as a HeadSet."""
    model, _, label = name.partition("/")
    entry = PAPER_EXAMPLE_HEADS.get(model)
    if entry is None or label not in entry["heads"]:
        known = [f"{m}/{n}" for m, e in PAPER_EXAMPLE_HEADS.items() for n in e["heads"]]
        raise ValueError(f"heads: no paper example {name!r}; known: {', '.join(known)}")
    return HeadSet(entry["heads"][label], note=entry["note"], **entry["model"])


def load_heads(spec) -> HeadSet:
    """A HeadSet from a ``.json`` path or ``"paper:<model>/<name>"``."""
    text = os.fspath(spec)
    if text.startswith("paper:"):
        return paper_example(text[len("paper:"):])
    if not os.path.exists(text):
        raise ValueError(f"heads: {text!r} is neither a head-set file (none exists there) nor 'paper:<model>/<name>' "
                         "nor 'layer:<l>'")
    return HeadSet.load(text)


# ---- progress --------------------------------------------------------------------------------------------------------
class _Progress:
    """tqdm if installed, else a plain line every 10 %."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.done, self.bar, self.enabled = total, desc, 0, None, enabled
        self._next = 0.1
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="img")
            except ImportError:
                print(f"{desc}: {total} images")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.total and self.done / self.total >= self._next:
            print(f"{self.desc}: {self.done}/{self.total} images")
            self._next = math.floor(self.done / self.total * 10 + 1) / 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _key(pair) -> str:
    return f"{pair[0]},{pair[1]}"


# ---- the greedy loop ------------------------------------------------------------------------------------------------
def greedy_select(pool: Iterable, evaluate: Callable[[list], list], *, k: int = 3, rounds: int = 5,
                  candidate_batch: int = 8, state: HeadSet | None = None, cost: int = 1,
                  budget: int | None = None, on_progress: Callable[[HeadSet], None] | None = None,
                  progress: bool = False) -> HeadSet:
    """Algorithm 1 over ``pool`` with ``evaluate(head_sets) -> mean rewards`` (one per candidate head set).

    ``state`` resumes an earlier run (its ``heads``, ``rounds``, ``scores`` and the current round's ``pending``
    scores are kept); ``cost`` is the number of images one candidate costs (M prompt-seed pairs) and ``budget``
    caps the images of this call: a batch is cut to what is left of it, and once no candidate fits, the state is
    returned with ``complete=False``. ``on_progress`` is called after every batch (saving).
    """
    pool = sorted({tuple(int(x) for x in p) for p in pool})
    state = state if state is not None else HeadSet([])
    spent = 0
    remaining_rounds = rounds - len(state.rounds)
    todo = sum(max(len(pool) - (len(state.rounds) + r) * k, 0) for r in range(remaining_rounds)) * cost
    todo -= len(state.pending) * cost
    bar = _Progress(max(todo, 0), "headhunter", progress)
    try:
        while len(state.rounds) < rounds:
            chosen = set(state.heads)
            candidates = [p for p in pool if p not in chosen]
            if not candidates:
                break
            todo_now = [p for p in candidates if _key(p) not in state.pending]
            while todo_now:
                chunk = todo_now[:candidate_batch]
                if budget is not None:
                    chunk = chunk[:max((budget - spent) // cost, 0)]  # the candidates the budget still pays for
                if not chunk:
                    state.complete = False
                    if on_progress:
                        on_progress(state)
                    return state
                scores = evaluate([list(state.heads) + [p] for p in chunk])
                for p, score in zip(chunk, scores):
                    state.pending[_key(p)] = float(score)
                todo_now = todo_now[len(chunk):]
                spent += len(chunk) * cost
                bar.update(len(chunk) * cost)
                if on_progress:
                    on_progress(state)
            ranked = sorted(candidates, key=lambda p: (-state.pending[_key(p)], p))
            new = ranked[:k]
            state.rounds.append(new)
            state.scores.append({_key(p): state.pending[_key(p)] for p in ranked})
            state.heads.extend(new)
            state.pending = {}
            if on_progress:
                on_progress(state)
        state.complete = True
        if on_progress:
            on_progress(state)
        return state
    finally:
        bar.close()


# ---- the search on a pipeline ---------------------------------------------------------------------------------------
def _fingerprint(prompts, seeds) -> str:
    return hashlib.sha256(json.dumps([list(prompts), list(seeds)]).encode()).hexdigest()[:16]


def search(pipe, reward: Callable, prompts: list[str], seeds: list[int] | None = None, *, k: int = 3,
           rounds: int = 5, scale: float | None = None, u: float = 1.0, cfg_scale: float = 0.0,
           mode: str = "joint_identity", pool=None, candidate_batch: int = 8, budget: int | None = None,
           save=None, resume: bool = True, progress: bool = True, **call_kwargs) -> HeadSet:
    """HeadHunter (Algorithm 1) on a diffusers SD3 / FLUX pipeline.

    ``reward(images, prompts) -> (B,)`` scores images (B, 3, H, W) in [0, 1] (the pipeline's ``output_type="pt"``)
    against their prompts (the paper: PickScore). ``seeds`` default to the prompt indices (official code).
    ``scale`` (w) defaults to 3 on SD3 and 8 on FLUX; ``u`` is the search-time SoftPAG weight (official: 1);
    ``cfg_scale`` is the CFG scale during the search (official: 0 = off; SD3 pipelines only, FLUX keeps its own
    guidance embedding). ``pool``: the candidate heads (anything ``heads=`` takes; default every head).
    ``budget``: the most images this call generates (it then saves and returns an incomplete set to resume).
    ``save``: a JSON path written after every batch and read back when ``resume``. Other keyword arguments go to
    every pipeline call (``num_inference_steps``, ``height``, ``width``...).

    Returns the HeadSet (``heads`` in selection order; ``rounds``, per-round ``scores``); load it with
    ``nograd.apply(pipe, "headhunter", heads=path_or_set)``.
    """
    import nograd
    from nograd.methods.softpag import head_table

    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("search: prompts must be a list of str (a single str would be searched per character)")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts) or not prompts:
        raise ValueError(f"search: need one seed per prompt (got {len(prompts)} prompts, {len(seeds)} seeds)")
    if not all(is_int(s) for s in seeds):
        raise ValueError(f"search: seeds={seeds!r} is not allowed; expected integers")
    seeds = [int(s) for s in seeds]
    if not (is_number(u) and 0 < u <= 1) or (scale is not None and not (is_number(scale) and scale != 0)):
        raise ValueError(f"search: u={u!r}, scale={scale!r} are not allowed; expected u in (0, 1] and scale None or "
                         "a nonzero number (the search scores the perturbation)")
    if call_kwargs.get("output_type", "pt") != "pt":
        raise ValueError(f"search: output_type={call_kwargs['output_type']!r} is not allowed; the reward gets the "
                         "pipeline's output_type='pt' images (B, 3, H, W) in [0, 1]")
    if save is not None and not os.path.isdir(os.path.dirname(os.path.abspath(os.fspath(save)))):
        raise FileNotFoundError(f"search: save={os.fspath(save)!r}: no folder to write it in")
    for name, value in (("k", k), ("rounds", rounds), ("candidate_batch", candidate_batch)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"search: {name}={value!r} is not allowed; expected an integer >= 1")
    if budget is not None and not (isinstance(budget, int) and budget >= len(prompts)):
        raise ValueError(f"search: budget={budget!r} is not allowed; expected None or an integer >= {len(prompts)} "
                         "(one candidate costs one image per prompt)")
    model, _ = nograd.resolve(pipe)
    from nograd.patches import adapter_for

    adapter = adapter_for(model)
    table = head_table(pool if pool is not None else {i: "all" for i in range(len(adapter.decoder_layers))},
                       1.0, adapter, "pool")
    candidates = [tuple(p) for p in torch.nonzero(table > 0).tolist()]
    if not candidates:
        raise ValueError("search: pool selects no head; expected at least one candidate (layer, head)")
    if cfg_scale and not hasattr(type(pipe), "do_classifier_free_guidance"):
        raise ValueError(f"search: cfg_scale={cfg_scale!r} is not allowed on {type(pipe).__name__}, which has no CFG "
                         "switch (FLUX keeps its guidance embedding); expected 0")
    config = dict(k=k, rounds=rounds, scale=scale, u=u, cfg_scale=cfg_scale, mode=mode, prompts=list(prompts),
                  seeds=seeds, fingerprint=_fingerprint(prompts, seeds), pool=_fingerprint(candidates, []),
                  reward=getattr(reward, "__name__", type(reward).__name__),
                  call_kwargs={key: repr(v) for key, v in sorted(call_kwargs.items())})
    shape = dict(model_class=type(model).__name__, num_layers=len(adapter.decoder_layers),
                 num_heads=adapter.num_heads, head_dim=adapter.head_dim)
    state = None
    if save is not None and resume and os.path.exists(os.fspath(save)):
        state = HeadSet.load(save)
        state.check(adapter)
        mismatch = [key for key in ("k", "rounds", "scale", "u", "cfg_scale", "mode", "fingerprint", "pool",
                                    "reward", "call_kwargs") if state.config.get(key) != config[key]]
        if mismatch:
            raise ValueError(f"search: {os.fspath(save)!r} holds a search with other settings ({', '.join(mismatch)}); "
                             "pass resume=False or another save path")
    if state is None:
        state = HeadSet([], config=config, note="nograd.headhunter.search", complete=False, **shape)

    per_call = dict(call_kwargs)
    per_call.setdefault("output_type", "pt")
    if hasattr(type(pipe), "do_classifier_free_guidance"):  # the property reads state a first call sets
        per_call.setdefault("guidance_scale", cfg_scale)
    num_layers, num_heads = shape["num_layers"], shape["num_heads"]
    handle = nograd.apply(pipe, "softpag", heads=candidates, u=u, scale=scale, mode=mode)
    guidance = handle.guidance
    generated = {"images": 0}

    def evaluate(head_sets: list) -> list[float]:
        weights = torch.zeros(len(head_sets), num_layers, num_heads)
        for row, heads in enumerate(head_sets):
            for layer, head in heads:
                weights[row, layer, head] = u
        totals = torch.zeros(len(head_sets), dtype=torch.float64)
        for prompt, seed in zip(prompts, seeds):
            guidance.state.row_weights = weights
            try:
                images = pipe([prompt] * len(head_sets),
                              generator=[torch.Generator().manual_seed(int(seed)) for _ in head_sets],
                              **per_call).images
            finally:
                guidance.state.row_weights = None
            generated["images"] += len(head_sets)
            if not isinstance(images, torch.Tensor):
                images = torch.stack([torch.as_tensor(i) for i in images])
            scores = torch.as_tensor(reward(images, [prompt] * len(head_sets)), dtype=torch.float64).cpu()
            if tuple(scores.shape) != (len(head_sets),) or not bool(torch.isfinite(scores).all()):
                raise ValueError(f"search: the reward must return one finite score per image, shape "
                                 f"({len(head_sets)},); got {tuple(scores.shape)} {scores.tolist()}")
            totals += scores
        return (totals / len(prompts)).tolist()

    try:
        result = greedy_select(candidates, evaluate, k=k, rounds=rounds, candidate_batch=candidate_batch,
                               state=state, cost=len(prompts), budget=budget, progress=progress,
                               on_progress=(lambda s: s.save(save)) if save is not None else None)
    finally:
        handle.remove()
    result.config = {**result.config, "images_generated_last_call": generated["images"]}
    if save is not None:
        result.save(save)
    return result


def estimate(num_candidates: int, prompts: int, k: int, rounds: int, steps: int) -> dict:
    """The search's cost: images and transformer row-evaluations (steps x 2 rows: cond + perturbed, CFG off)."""
    images = sum(max(num_candidates - r * k, 0) for r in range(rounds)) * prompts
    return {"images": images, "transformer_rows": images * steps * 2}
