"""CARVE: contrastive attention refinement for visual enhancement (Ge et al., arXiv 2509.06461).

*Focusing by Contrastive Attention: Enhancing VLMs' Visual Reasoning*; official code ``YuyaoGe/CARVE`` (spec
``carve.md``). Three passes over one image:
1. the task pass on (image, question + suffix) and 2. the general pass on (image, "Write a general description of
   the image." + suffix), a plain argmax (no logits processor of the checkpoint's ``generation_config``), up to 32
   tokens each (the task pass's answer in full: the baseline), recording at every step t and every layer l of the
   window the head-mean attention row of the last position over the image tokens (softmax over *all* keys);
2. the contrast ``A_Q / (A_G + lambda)`` per layer and step (steps paired by index, official ``lam=1e-8``), summed
   over layers and weighted by ``t + 1`` over steps (the code's v4, ``steps="all"``), spread over the image's pixels
   (``carve_geometry``), thresholded at the top ``p`` pixels, cut into 4-connected regions of which the best are
   kept, and the image blacked out around them, cropped and enlarged (``carve_regions``);
3. the final pass on the original *and* the refined image (the official code; the paper's Algorithm 1 shows the
   refined image only: ``final_images="refined"``).
The rows are read through nograd's shared attention path (``AttentionCall.attention_rows``): the model keeps its
own attention implementation and its KV cache, no ``output_attentions``, no eager, and the outputs of the probe
passes are those of the plain model. The two probes run as one left-padded batch; the general pass is cached per
image. Official defaults (``carve/pipeline.py``): layers ``range(20, 26)`` (scaled by 20/28..25/28 for models with
fewer than 26 layers), ``top_percent=0.2``, ``min_keep_regions=3`` used as a *minimum* (``keep_rule="official"``),
``attention_sum`` ranking; ``preset="paper"`` gives the paper's variant (t_end, K as a maximum, the best cell of its
Fig. 7: p=0.4, K=2, the refined image alone). Where we fix the official code: the LLaVA-1.5 map covers the
processor's centre crop (not the stretched image) and nothing outside it is kept, Qwen grids come from
``image_grid_thw`` (no square guess), and an empty or flat map leaves the image as it is (never a black image).
``prompt_style="official"`` gives LLaVA-1.5 the official code's literal prompt in place of the chat template.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import PIL.Image
import torch

from ..attention import AttentionCall, Intervention, intervene
from ..config import MethodConfig, is_int, is_number, option
from ..errors import UnsupportedModelError
from ..forward_inputs import execution_device
from ..handle import attached
from ..registry import register
from .base import Method
from .carve_geometry import GEOMETRIES, covered_pixels, processor_views, to_pixels
from .carve_regions import KEEP_RULES, REFINE_MODES, STRATEGIES, is_flat, refine_image, select_regions

GENERAL_PROMPT = "Write a general description of the image."
ANSWER_SUFFIX = " Answer the question using a single word or phrase."
STEPS = ("all", "first", "last")
PROMPT_STYLES = ("chat", "official")
PRESETS = {"paper": dict(steps="last", keep_rule="paper", top_p=0.4, min_regions=2, final_images="refined")}
GENERAL_CACHE_SIZE = 32
"""The general passes kept (the images seen last): on LLaVA-1.5 shapes one is ~0.4 MB (steps x layers x 576)."""


@dataclass(frozen=True)
class CARVEConfig(MethodConfig):
    processor: object = option(None, "the model's processor (chat template + image processor); a pipeline's own "
                                     "when None")
    preset: object = option(None, "None (the official code's defaults) or 'paper' (t_end, K as a maximum, p=0.4, "
                                  "K=2, the refined image alone); options given explicitly win")
    layers: object = option("paper", "decoder layers read: 'paper' = range(20, 26), scaled for models with fewer "
                                     "than 26 layers, or a list of layer indices")
    general_prompt: str = option(GENERAL_PROMPT, "the general instruction G (paper App. D)")
    answer_suffix: object = option(ANSWER_SUFFIX, "appended to the question and to G (official code); None: nothing")
    lam: float = option(1e-8, "lambda in A_Q / (A_G + lambda) (official lam)")
    steps: str = option("all", "decoding steps fused: 'all' (weights t+1, official v4), 'first', or 'last' (each "
                               "pass's last step before EOS, the paper's t_end)", choices=STEPS)
    top_p: float = option(0.2, "fraction of pixels above the threshold (official top_percent)")
    min_regions: int = option(3, "K regions (official min_keep_regions)")
    keep_rule: str = option("official", "'official': keep max(K, floor(p n)) regions; 'paper': min(K, n)",
                            choices=KEEP_RULES)
    strategy: str = option("attention_sum", "region ranking", choices=STRATEGIES)
    refine_mode: str = option("mask_crop_resize", "what the refined image is", choices=REFINE_MODES)
    final_images: str = option("both", "'both' (original then refined, official code) or 'refined' (paper)",
                               choices=("both", "refined"))
    probe_max_new_tokens: int = option(32, "tokens generated by each probe pass (official max_new_tokens)")
    max_new_tokens: int = option(32, "tokens generated by the final pass")
    cache_general: bool = option(True, "reuse the general pass of an image seen before", choices=(True, False))
    geometry: str = option("processor", "LLaVA-1.5: the map over the processor's centre crop, or stretched over the "
                                        "whole image as the official code ('official')", choices=GEOMETRIES)
    prompt_style: str = option("chat", "'chat' (the processor's chat template) or, LLaVA-1.5 only, 'official': the "
                                       "official code's literal '<image>\\nUSER: {q} {suffix}\\nASSISTANT:'",
                               choices=PROMPT_STYLES)

    @classmethod
    def from_options(cls, options):
        preset = options.get("preset")
        if preset is not None and not (isinstance(preset, str) and preset in PRESETS):
            raise ValueError(f"carve: option preset={preset!r} is not allowed; expected None or one of "
                             f"{', '.join(map(repr, PRESETS))}")
        return super().from_options({**PRESETS.get(preset, {}), **options})

    def validate(self) -> None:
        if not (self.layers == "paper" or isinstance(self.layers, (list, tuple, range)) and self.layers
                and all(is_int(v) for v in self.layers)):
            self.invalid("layers", "'paper' or a non-empty list of decoder layer indices")
        if not (is_number(self.lam) and self.lam >= 0):
            self.invalid("lam", "a number >= 0")
        if not (is_number(self.top_p) and 0 < self.top_p <= 1):
            self.invalid("top_p", "a fraction in (0, 1]")
        for name in ("min_regions", "probe_max_new_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if not (is_int(value) and value >= 1):
                self.invalid(name, "an int >= 1")
        if not isinstance(self.general_prompt, str) or not self.general_prompt:
            self.invalid("general_prompt", "a non-empty string")
        if self.answer_suffix is not None and not isinstance(self.answer_suffix, str):
            self.invalid("answer_suffix", "None or a string")


@dataclass
class ProbeRun:
    """One probe pass of one prompt: the rows it recorded and how it ended."""

    maps: torch.Tensor
    """(T, L, N_v) fp32: per step and layer, the head-mean attention of the last position over the image tokens."""
    text: str
    ended: bool
    """Whether the last recorded step predicted EOS."""

    def step(self, which: str) -> int:
        if which == "first":
            return 0
        return max(len(self.maps) - 1 - int(self.ended), 0)


@dataclass
class CARVEOutput:
    """What ``handle.generate`` returns; ``str(output)`` is the refined answer."""

    text: str
    original_text: str
    saliency: torch.Tensor
    mask: torch.Tensor
    refined_image: object
    bbox: tuple | None
    flat: bool
    empty: bool
    regions: int = 0
    maps: dict = field(default_factory=dict)
    """The raw rows: "task" and "general" (T, L, N_v) fp32, and "positions", the probe batch's image-key positions."""
    texts: list[str] = field(default_factory=list)
    """Every answer of the final pass (``num_return_sequences`` of them); ``text`` is the first."""

    def __str__(self) -> str:
        return self.text


class RowCapture(Intervention):
    """Read-out on one decoder layer: while the probe is recording, the last position's softmax row (over every
    key), averaged over heads, at the image tokens."""

    observes = True

    def __init__(self, probe: "RowProbe", slot: int):
        self.probe = probe
        self.slot = slot

    def observe(self, call: AttentionCall) -> None:
        if self.probe.index is None:
            return
        rows = call.attention_rows(torch.tensor([call.shape[2] - 1]), edited=False)
        self.probe.record(self.slot, rows[:, :, 0].mean(dim=1))


class RowProbe:
    """The recording state of a probe pass: the image-token key positions of each batch row and the rows read."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.index: torch.Tensor | None = None
        self.records: list[list[torch.Tensor]] = []

    def start(self, index: torch.Tensor, length: int) -> None:
        """``index``: (B, N_v) key positions in the prompt of ``length`` tokens."""
        self.index, self.length, self.records = index, length, [[] for _ in range(self.num_layers)]

    def record(self, slot: int, probs: torch.Tensor) -> None:
        """``probs`` (B, K): the row over the keys the layer sees. A sliding-window layer's cache (Gemma3; dynamic,
        or static once full) holds only the last K of the ``length + t`` positions at decoding step t, in order: the
        image keys are shifted into it, and those it no longer holds (which the window masks anyway) read 0. A
        static cache not yet full (K > length + t) holds position j at key j."""
        offset = max(self.length + len(self.records[slot]) - probs.shape[1], 0)
        index = self.index.to(probs.device) - offset
        kept = index >= 0
        rows = probs.float().gather(1, index.clamp(min=0)) * kept
        self.records[slot].append(rows.cpu())

    def stop(self) -> torch.Tensor:
        """(B, T, L, N_v): the rows recorded since ``start``."""
        self.cancel()
        return torch.stack([torch.stack(steps, dim=1) for steps in self.records], dim=2)

    def cancel(self) -> None:
        """Record no more (a pass that failed keeps what it recorded unread)."""
        self.index = None


@register
class CARVE(Method):
    name = "carve"
    summary = "contrast a VLM's attention for the question against a general prompt, mask and crop the image to it"
    paper = "Focusing by Contrastive Attention: Enhancing VLMs' Visual Reasoning"
    arxiv = "2509.06461"
    kinds = ("vlm",)
    families = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "qwen3_vl", "gemma3",
                "mistral3", "internvl")
    own_generate = True
    reads = ("token_layout",)  # its row probes read image keys by position, which token dropping moves
    Config = CARVEConfig

    def layers(self) -> list[int]:
        depth = self.adapter.num_layers
        if self.config.layers != "paper":
            return list(self.config.layers)
        if depth >= 26:
            return list(range(20, 26))
        first = min(round(depth * 20 / 28), depth - 1)
        return list(range(first, min(max(round(depth * 25 / 28), first), depth - 1) + 1))

    def check_model(self) -> None:
        if not hasattr(self.adapter.model, "generate"):
            raise UnsupportedModelError(f"carve answers with model.generate: apply it to the generating model (a "
                                        f"...ForConditionalGeneration), not {type(self.adapter.model).__name__}")
        depth = self.adapter.num_layers
        if any(not 0 <= layer < depth for layer in self.layers()):
            self.config.invalid("layers", f"decoder layer indices in 0..{depth - 1}")
        if self.config.prompt_style == "official" and self.adapter.family != "llava":
            self.config.invalid("prompt_style", f"'chat' on a {self.adapter.family} model ('official' is the official "
                                                "code's LLaVA-1.5 prompt)")

    def attach(self, handle) -> None:
        self.processor = self.config.processor if self.config.processor is not None else handle.processor
        if self.processor is None or not hasattr(self.processor, "apply_chat_template"):
            raise ValueError("carve builds its prompts with the model's processor: nograd.apply(model, 'carve', "
                             "processor=processor), or apply it to a transformers pipeline")
        self.handle, self.model, self.stats = handle, handle.model, handle.stats
        self.general_cache: OrderedDict[str, ProbeRun] = OrderedDict()
        """The general passes of the last ``GENERAL_CACHE_SIZE`` images, least recently used first."""
        self.probe = RowProbe(len(self.layers()))
        modules = self.adapter.attention_modules
        for slot, layer in enumerate(self.layers()):
            intervene(handle, {modules[layer]: RowCapture(self.probe, slot)})
        handle.stats.update(layers=self.layers(), passes=0, general_cache_hits=0)
        handle.expose("generate", self.generate)
        handle.expose("saliency", self.saliency)
        handle.expose("refine", self.refine)
        handle.expose("build_inputs", self.build_inputs)
        if handle.target is not handle.model and hasattr(handle.target, "_forward"):
            self._run_inside(handle, handle.target)

    def _run_inside(self, handle, pipe) -> None:
        """Inside an ``image-text-to-text`` pipeline: its ``preprocess`` takes the image and question of each call
        (``pipe(images=image, text=question)``, the question with or without the image token, or one user turn in
        chat form), its ``_forward`` runs CARVE on them instead of one ``generate`` and hands ``postprocess`` the
        final pass's prompt and tokens (so the pipeline's text outputs work as usual). Both are instance
        attributes, deleted again by ``remove()``."""

        def carve_preprocess(inputs=None, **kwargs):
            image, question = self._pipeline_request(inputs)
            return {"text": inputs if not isinstance(inputs, dict) else inputs["text"], "carve": (image, question)}

        def carve_forward(model_inputs, generate_kwargs=None):
            image, question = model_inputs["carve"]
            self.generate(image, question, **(generate_kwargs or {}))  # the call's max_new_tokens, ...
            input_ids = self.final_inputs["input_ids"]
            sequence = torch.cat([input_ids, self.final_tokens.to(input_ids.device)], dim=1)
            return {"generated_sequence": sequence, "prompt_text": model_inputs["text"], "input_ids": input_ids}

        own = {name: vars(pipe)[name] for name in ("preprocess", "_forward") if name in vars(pipe)}
        pipe.preprocess, pipe._forward = carve_preprocess, carve_forward

        def restore():
            for name in ("preprocess", "_forward"):
                if name in own:
                    setattr(pipe, name, own[name])
                else:
                    delattr(pipe, name)

        handle.on_remove("pipeline preprocess/_forward", restore)

    def _pipeline_request(self, inputs) -> tuple:
        """(image, question) of one pipeline call: ``{"images": image, "text": question}`` or a one-turn chat."""
        from transformers.image_utils import load_image

        usage = ("carve in a pipeline takes one image and one question: pipe(images=image, text=question) or a "
                 "chat with one user turn holding one image and one text")
        if isinstance(inputs, dict) and isinstance(inputs.get("text"), str) and inputs.get("images") is not None:
            images = inputs["images"]
            if isinstance(images, (list, tuple)):
                if len(images) != 1:
                    raise NotImplementedError(usage)
                images = images[0]
            return load_image(images), inputs["text"]
        messages = getattr(inputs, "messages", None)
        if messages is None or len(messages) != 1:
            raise NotImplementedError(usage)
        content = messages[0].get("content")
        content = [content] if isinstance(content, (str, dict)) else content or []
        images = [c for c in content if isinstance(c, dict) and c.get("type") == "image"]
        texts = [c["text"] if isinstance(c, dict) else c for c in content
                 if isinstance(c, str) or isinstance(c, dict) and c.get("type") == "text"]
        if len(images) != 1 or len(texts) != 1:
            raise NotImplementedError(usage)
        source = next((images[0][k] for k in ("image", "url", "path") if images[0].get(k) is not None), None)
        if source is None:
            raise NotImplementedError(usage)
        return load_image(source), texts[0]

    def _request(self, image, question) -> tuple:
        """One PIL image and one question, with the processor's image token taken out of the question (the prompt
        places the image itself; a pipeline's text prompt holds one)."""
        if isinstance(image, (list, tuple)) or isinstance(question, (list, tuple)):
            raise NotImplementedError("carve takes one image and one question per call (a PIL image and a str); "
                                      "call it once per pair")
        if not isinstance(question, str):
            raise TypeError(f"carve takes the question as a str; got {type(question).__name__}")
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(f"carve takes a PIL image; got {type(image).__name__} (a tensor: PIL.Image.fromarray)")
        token = getattr(self.processor, "image_token", None)
        return image, (question.replace(token, "") if token else question).strip()

    # ---- prompts ------------------------------------------------------------------------------------------------
    def _prompt(self, question: str) -> str:
        return question + (self.config.answer_suffix or "")

    def _prompt_string(self, text: str, images_per_text: int = 1) -> str:
        """The prompt string of ``text`` after ``images_per_text`` images (spec §5.4): one user turn of the
        processor's chat template, or with ``prompt_style="official"`` (LLaVA-1.5) the official code's literal
        ``"<image>\\nUSER: {q} {suffix}\\nASSISTANT:"``, ``"<image><image>\\n..."`` in the two-image final pass
        (spec §3, Prompts)."""
        if self.config.prompt_style == "official":
            return f"{self.processor.image_token * images_per_text}\nUSER: {text}\nASSISTANT:"
        chat = [{"role": "user", "content": [{"type": "image"}] * images_per_text + [{"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    def build_inputs(self, images: list, texts: list[str], images_per_text: int = 1):
        """Processor inputs for ``texts`` (``_prompt_string`` each, ``images_per_text`` images first), left-padded. The
        images go to the processor nested per text (a list per prompt): processors that check the images of each
        prompt (Gemma3) need it, and LLaVA-OneVision reads a two-image prompt from it (``batch_num_images``)."""
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        prompts = [self._prompt_string(text, images_per_text) for text in texts]
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            nested = [list(images[i * images_per_text:(i + 1) * images_per_text]) for i in range(len(texts))]
            inputs = self.processor(text=prompts, images=nested, padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = side
        return inputs.to(execution_device(self.model))

    def _generate(self, inputs, options: dict) -> torch.Tensor:
        """The new tokens of ``model.generate``: greedy, ``options`` over that; a ``generation_config`` in them sets
        every other option itself (loose ones would override it)."""
        if "generation_config" not in options:
            options = {"do_sample": False, **options}
        with torch.no_grad():
            out = self.model.generate(**inputs, **options)
        self.stats["passes"] += 1
        sequences = out if isinstance(out, torch.Tensor) else out.sequences  # return_dict_in_generate
        return sequences[:, inputs["input_ids"].shape[1]:]

    def _probe_generate(self, inputs) -> torch.Tensor:
        """The probe passes' tokens, ``probe_max_new_tokens`` of them: a plain argmax, as the official
        ``generate_with_attention`` (no logits processor). ``model.generate`` fills every option its
        ``generation_config`` leaves unset (None) from the model's own (a checkpoint's ``repetition_penalty``,
        ``suppress_tokens``, ``forced_bos_token_id``...), so the model's is swapped, for the pass, for a clean one
        that keeps only its special token ids. The final pass keeps the model's settings, as the official code."""
        from transformers import GenerationConfig

        own = self.model.generation_config
        ids = {name: getattr(own, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
        self.model.generation_config = GenerationConfig(**ids)
        try:
            return self._generate(inputs, {"max_new_tokens": self.config.probe_max_new_tokens})
        finally:
            self.model.generation_config = own

    def _decode(self, tokens: torch.Tensor) -> list[str]:
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]

    # ---- passes 1-2 -----------------------------------------------------------------------------------------------
    def _probe(self, image, questions: list[str]) -> tuple[list[ProbeRun], tuple]:
        """Probe passes on ``image`` for each of ``questions`` (one left-padded batch); also the views of row 0.
        Every row generates its whole answer, with ``steps="first"`` too: the task pass's text is the baseline answer
        (spec §5.1), and the general row, in the same batch, would save nothing by stopping at its first step."""
        inputs = self.build_inputs([image] * len(questions), questions)
        image_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        grids = self.adapter.image_grids(inputs["input_ids"], **image_inputs)
        if len(grids) != len(questions):
            raise NotImplementedError(f"carve: the processor wrote {len(grids)} images for {len(questions)} prompts "
                                      "of one image each (e.g. Gemma3's pan-and-scan crops, written as images of "
                                      "their own); carve reads one image per prompt")
        located = [processor_views(self.adapter, self.processor, grid, image.size, self.config.geometry)
                   for grid in grids]
        index = torch.stack([positions for positions, _ in located])
        self.positions = index
        self.probe.start(index, inputs["input_ids"].shape[1])
        try:
            tokens = self._probe_generate(inputs)
        except BaseException:
            self.probe.cancel()  # the error is the generation's own, not one of reading its partial record
            raise
        maps = self.probe.stop()
        eos = self.model.generation_config.eos_token_id
        eos = set([eos] if isinstance(eos, int) else eos or [])
        runs = []
        for row, generated in enumerate(tokens.tolist()):
            ends = [i for i, token in enumerate(generated) if token in eos]
            count = ends[0] + 1 if ends else len(generated)
            runs.append(ProbeRun(maps[row, :count].clone(),  # its own storage, not the batch's (it may be cached)
                                 self._decode(tokens[row:row + 1, :count])[0], bool(ends)))
        return runs, located[0][1]

    def _image_key(self, image) -> str:
        """The general pass's cache key: the image and what makes its tokens (the image processor's settings, which
        a user may change between calls), the general prompt, and the methods attached beside CARVE (their
        attention is what the pass reads: one applied or removed later makes an earlier pass stale)."""
        digest = hashlib.sha1(image.tobytes()).hexdigest()
        settings = getattr(getattr(self.processor, "image_processor", None), "to_dict", dict)()
        setup = hashlib.sha1(repr(sorted(settings.items(), key=lambda item: item[0])).encode()).hexdigest()
        beside = ",".join(str(id(handle)) for handle in attached(self.model) if handle is not self.handle)
        return f"{digest}:{image.size}:{image.mode}:{setup}:{self.config.general_prompt}:{beside}"

    def _task_and_general(self, image, question: str):
        key = self._image_key(image)
        general = self.general_cache.get(key) if self.config.cache_general else None
        prompts = [self._prompt(question)] + ([] if general else [self._prompt(self.config.general_prompt)])
        runs, views = self._probe(image, prompts)
        if general is None:
            general = runs[1]
            if self.config.cache_general:
                self.general_cache[key] = general
                while len(self.general_cache) > GENERAL_CACHE_SIZE:
                    self.general_cache.popitem(last=False)
        else:
            self.general_cache.move_to_end(key)
            self.stats["general_cache_hits"] += 1
        return runs[0], general, views

    def _fuse(self, task: ProbeRun, general: ProbeRun) -> torch.Tensor:
        """(N_v,) the contrast summed over the window's layers and weighted over the steps (spec §1.3)."""
        lam = self.config.lam
        if self.config.steps == "all":
            count = min(len(task.maps), len(general.maps))
            weights = torch.arange(1, count + 1, dtype=torch.float32)
            ratio = task.maps[:count] / (general.maps[:count] + lam)
            return (ratio.sum(dim=1) * weights[:, None]).sum(dim=0)
        which = self.config.steps
        return (task.maps[task.step(which)] / (general.maps[general.step(which)] + lam)).sum(dim=0)

    def _saliency(self, image, question: str):
        """The (H, W) saliency, the (H, W) pixels its map covers (``covered_pixels``) and the task pass."""
        task, general, views = self._task_and_general(image, question)
        self.maps = {"task": task.maps, "general": general.maps, "positions": self.positions}
        covered = covered_pixels(views, image.size)
        return to_pixels(self._fuse(task, general), views, image.size, covered), covered, task

    # ---- the user's calls -----------------------------------------------------------------------------------------
    def saliency(self, image, question: str) -> torch.Tensor:
        """(H, W) fp32 saliency of ``question`` on ``image`` in pixel space (passes 1-2), for plotting."""
        return self._saliency(*self._request(image, question))[0]

    def _refined(self, image, saliency: torch.Tensor, covered: torch.Tensor):
        """(refined image, regions, flat): regions only where the map covers the image (spec §5.2: outside
        LLaVA-1.5's centre crop nothing is ever kept)."""
        if is_flat(saliency):
            self.stats.update(flat=True, empty=False, regions=0)
            return image.copy(), None, True
        regions = select_regions(saliency, self.config.top_p, self.config.min_regions, self.config.keep_rule,
                                 self.config.strategy, valid=covered)
        self.stats.update(flat=False, empty=regions.bbox is None, regions=regions.kept)
        return refine_image(image, regions, self.config.refine_mode), regions, False

    def refine(self, image, question: str):
        """The image the final pass sees next to the original: masked, cropped and enlarged around the regions."""
        image, question = self._request(image, question)
        saliency, covered, _ = self._saliency(image, question)
        return self._refined(image, saliency, covered)[0]

    def generate(self, image, question: str, **generate_kwargs) -> CARVEOutput:
        """CARVE's answer to ``question`` on ``image`` (a PIL image): probe passes, refinement, final pass.
        ``generate_kwargs`` go to the final pass's ``model.generate`` (over ``max_new_tokens`` and greedy decoding;
        a ``generation_config`` among them sets those itself); the probe passes keep the configured ones."""
        image, question = self._request(image, question)
        saliency, covered, task = self._saliency(image, question)
        refined, regions, flat = self._refined(image, saliency, covered)
        empty = regions is not None and regions.bbox is None
        images = [image, refined] if self.config.final_images == "both" else [refined]
        inputs = self.build_inputs(images, [self._prompt(question)], images_per_text=len(images))
        self.final_inputs = inputs
        defaults = {} if "generation_config" in generate_kwargs else {"max_new_tokens": self.config.max_new_tokens}
        self.final_tokens = self._generate(inputs, {**defaults, **generate_kwargs})
        texts = self._decode(self.final_tokens)
        mask = regions.mask if regions is not None else torch.ones(saliency.shape, dtype=torch.bool)
        return CARVEOutput(text=texts[0], texts=texts, original_text=task.text, saliency=saliency, mask=mask,
                           refined_image=refined, bbox=None if regions is None else regions.bbox, flat=flat,
                           empty=empty, regions=regions.kept if regions is not None else 0, maps=self.maps)
