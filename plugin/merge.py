"""Weight merging shared by the merge methods (FRANK and its peer rules): where the decoder tensors are, how they
combine, and the streamed safetensors merge behind ``nograd.merge``.

- **Sides.** A model or a checkpoint folder seen as a decoder: ``num_layers``, the tensors of each layer by their
  suffix inside the layer (``self_attn.q_proj.weight``), and the three non-layer tensors (``embed``, ``norm``,
  ``lm_head``). ``ModelSide`` reads a loaded model (through ``get_decoder()``; accelerate-offloaded weights through
  the module's hook) and, as the in-place destination, writes to it. ``CheckpointSide`` reads a safetensors folder
  tensor by tensor (``safetensors.safe_open``); pickle checkpoints (``.bin``/``.pt``) are refused.
- **Name mapping** (spec ``frank.md`` §5.2). Work relative to each decoder layer: layer ``i`` of a text LLM
  (``model.layers.{i}.``) pairs with layer ``i`` of the MLLM's language model, whatever its prefix: in memory
  ``model.language_model.layers.{i}.`` for every family transformers 5 ships (Qwen2/2.5/3-VL, the LLaVA family,
  InternVL-hf, Mistral3, Gemma3); on disk, as ``save_pretrained`` writes them, ``model.layers.{i}.`` (Qwen2/2.5-VL),
  ``model.language_model.layers.{i}.`` (Qwen3-VL) or ``language_model.model.layers.{i}.`` (LLaVA family, InternVL-hf,
  Mistral3, Gemma3, and the remote-code InternVL checkpoints). ``LAYER_PREFIXES`` lists the prefixes probed, in order.
  The streamed merge writes every key under the name it has in the MLLM's checkpoint.
- **Rules**, per tensor (``combine``): ``frank``/``linear`` are ``lerp(θ_V, θ_R, λ_R)`` (λ_V + λ_R = 1, so the base
  cancels and λ_R = 0 returns θ_V bit-for-bit); ``task_arithmetic``, ``ties`` and ``dare_ties`` are θ_0 plus
  ``peft.utils.merge_utils``' combination of the task vectors (τ_V, τ_R) with weights (λ_V, λ_R).
- **Memory.** Tensors are read one at a time; the arithmetic upcasts to fp32, so the extra memory is about three
  times the largest tensor in fp32 (V, R and the result; the statistics pass reads B instead of the result).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LAYER_PREFIXES = (
    "model.language_model.layers.",  # transformers 5 in-memory names; Qwen3-VL on disk
    "language_model.model.layers.",  # LLaVA family, InternVL(-hf), Mistral3, Gemma3 on disk
    "model.layers.",  # text LLMs; Qwen2/2.5-VL on disk
    "model.text_model.layers.",  # Idefics3 / SmolVLM in memory
    "model.language_model.model.layers.",
    "language_model.layers.",
    "model.decoder.layers.",
)
ROLES = ("embed", "norm", "lm_head")
RULES = ("frank", "linear", "task_arithmetic", "ties", "dare_ties")
SUM_TO_ONE = ("frank", "linear")
NEEDS_BASE = ("task_arithmetic", "ties", "dare_ties")

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# ---- checkpoints ---------------------------------------------------------------------------------------------------
class Checkpoint:
    """A safetensors checkpoint (a ``save_pretrained`` folder, sharded or not, or one ``.safetensors`` file), read
    one tensor at a time. Never unpickles anything: a folder with only ``.bin``/``.pt`` weights raises ``ValueError``."""

    def __init__(self, path):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ValueError(f"{str(path)!r} is not a .safetensors file; nograd reads safetensors checkpoints "
                                 "only (pickle files such as .bin/.pt are never loaded)")
            self.folder, files, self.indexed = path.parent, [path.name], False
        else:
            self.folder = path
            index = path / SAFE_INDEX
            self.indexed = index.exists()
            if self.indexed:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            elif (path / SAFE_SINGLE).exists():
                files = [SAFE_SINGLE]
            else:
                files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
                if pickles:
                    raise ValueError(
                        f"{str(path)!r} holds pickle weights ({', '.join(pickles[:3])}) and no safetensors: nograd "
                        "never loads pickle checkpoints. Convert it once in a trusted environment, e.g. "
                        "`AutoModel.from_pretrained(path).save_pretrained(new_path)` (safetensors by default)")
                raise ValueError(f"{str(path)!r} holds no .safetensors weights")
        from safetensors import safe_open

        self._open = {name: safe_open(str(self.folder / name), framework="pt", device="cpu") for name in files}
        self.files = files
        self.weight_map: dict[str, str] = {}
        for name in files:  # the order keys have in each file (by offset), files in index order
            handle = self._open[name]
            for key in _keys_by_offset(self.folder / name, handle):
                self.weight_map[key] = name

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def _slice(self, key: str):
        return self._open[self.weight_map[key]].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype_name(self, key: str) -> str:
        return self._slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        return self._open[self.weight_map[key]].get_tensor(key)

    def read_json(self, name: str) -> dict:
        file = self.folder / name
        return json.loads(file.read_text()) if file.exists() else {}


def _keys_by_offset(file: Path, handle) -> list[str]:
    """The keys of one safetensors file in the order of their data (how save_pretrained wrote them)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


# ---- sides ---------------------------------------------------------------------------------------------------------
def text_config_dict(config: dict) -> dict:
    """The language model's part of a (possibly multimodal) config dict."""
    for key in ("text_config", "llm_config"):
        if isinstance(config.get(key), dict):
            return config[key]
    return config


def rope_theta(config: dict):
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return config.get("rope_theta", rope.get("rope_theta") if isinstance(rope, dict) else None)


class Side:
    """One model seen as a decoder. ``what`` names it in messages ("mllm", "reasoning", "base")."""

    what: str
    num_layers: int

    def suffixes(self, layer: int) -> list[str]:
        raise NotImplementedError

    def name(self, layer: int, suffix: str) -> str:
        raise NotImplementedError

    def shape(self, layer: int, suffix: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, layer: int, suffix: str) -> torch.Tensor:
        raise NotImplementedError

    def role_name(self, role: str) -> str | None:
        raise NotImplementedError

    def role_shape(self, role: str) -> tuple[int, ...] | None:
        raise NotImplementedError

    def read_role(self, role: str) -> torch.Tensor:
        raise NotImplementedError

    def text_config(self) -> dict:
        return {}

    def added_tokens(self) -> dict[str, int]:
        return {}


BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers that older checkpoints saved inside the decoder layers (Llama-era rotary ``inv_freq``, non-persistent
now): not weights, so never compared or merged; an MLLM's are carried over as they are."""


class CheckpointSide(Side):
    """A safetensors folder: decoder layers under the first of ``LAYER_PREFIXES`` that holds layer 0."""

    def __init__(self, checkpoint: Checkpoint | str | os.PathLike, what: str):
        self.ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        self.what = what
        keys = self.ckpt.keys()
        self.prefix = next((p for p in LAYER_PREFIXES if any(k.startswith(p + "0.") for k in keys)), None)
        if self.prefix is None:
            raise ValueError(f"{what}: no decoder layers found in {str(self.ckpt.folder)!r} (looked for keys "
                             f"starting with {', '.join(p + '0.' for p in LAYER_PREFIXES)})")
        self._layers: dict[int, list[str]] = {}
        for key in keys:
            if key.startswith(self.prefix):
                index, _, suffix = key[len(self.prefix):].partition(".")
                if index.isdigit() and not suffix.endswith(BUFFER_SUFFIXES):
                    self._layers.setdefault(int(index), []).append(suffix)
        self.num_layers = len(self._layers)
        if sorted(self._layers) != list(range(self.num_layers)):
            raise ValueError(f"{what}: the decoder layers of {str(self.ckpt.folder)!r} are not numbered 0..n-1")
        stem = self.prefix[: -len("layers.")]
        lm_heads = [k for k in keys if k.endswith("lm_head.weight") and "vision" not in k and "visual" not in k]
        self._roles = {"embed": stem + "embed_tokens.weight", "norm": stem + "norm.weight",
                       "lm_head": lm_heads[0] if lm_heads else None}
        self._roles = {r: (k if k is not None and k in self.ckpt else None) for r, k in self._roles.items()}

    def suffixes(self, layer):
        return sorted(self._layers[layer])

    def name(self, layer, suffix):
        return f"{self.prefix}{layer}.{suffix}"

    def shape(self, layer, suffix):
        return self.ckpt.shape(self.name(layer, suffix))

    def read(self, layer, suffix):
        return self.ckpt.get(self.name(layer, suffix))

    def role_name(self, role):
        return self._roles[role]

    def role_shape(self, role):
        key = self._roles[role] or (self._roles["embed"] if role == "lm_head" else None)
        return None if key is None else self.ckpt.shape(key)

    def read_role(self, role):
        key = self._roles[role] or (self._roles["embed"] if role == "lm_head" else None)  # tied: lm_head = embed
        return self.ckpt.get(key)

    def text_config(self):
        return text_config_dict(self.ckpt.read_json("config.json"))

    def added_tokens(self):
        tokens = self.ckpt.read_json("tokenizer.json").get("added_tokens", [])
        return {t["content"]: t["id"] for t in tokens if "content" in t and "id" in t}

    def layer_key(self, key: str) -> tuple[int, str] | None:
        """(layer, suffix) of a checkpoint key inside the decoder layers, else None."""
        if not key.startswith(self.prefix):
            return None
        index, _, suffix = key[len(self.prefix):].partition(".")
        return (int(index), suffix) if index.isdigit() and not suffix.endswith(BUFFER_SUFFIXES) else None


def decoder_of(model: nn.Module) -> nn.Module:
    """The module that holds a model's decoder layers: ``get_decoder()``, else ``model.language_model`` probes."""
    candidates = []
    if hasattr(model, "get_decoder"):
        try:
            candidates.append(model.get_decoder())
        except (AttributeError, NotImplementedError, TypeError):
            pass
    inner = getattr(model, "model", None)
    candidates += [getattr(inner, "language_model", None), getattr(model, "language_model", None), inner, model]
    for candidate in candidates:
        if candidate is None:
            continue
        if hasattr(candidate, "layers"):
            return candidate
        if hasattr(getattr(candidate, "model", None), "layers"):
            return candidate.model
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


class ModelSide(Side):
    """A loaded model (any device; accelerate-offloaded weights are read through the module's hook)."""

    def __init__(self, model: nn.Module, what: str, decoder: nn.Module | None = None):
        self.model = model
        self.what = what
        self.decoder = decoder if decoder is not None else decoder_of(model)
        self.layers = list(self.decoder.layers)
        self.num_layers = len(self.layers)
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self._names = names
        self._roles = {"embed": self._find(self.decoder, "embed_tokens"), "norm": self._find(self.decoder, "norm"),
                       "lm_head": None}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and getattr(head, "weight", None) is not None:
            self._roles["lm_head"] = (head, "weight")

    @staticmethod
    def _find(module, attr):
        child = getattr(module, attr, None)
        return (child, "weight") if child is not None and getattr(child, "weight", None) is not None else None

    def _param(self, layer, suffix) -> tuple[nn.Module, str]:
        module_path, _, local = suffix.rpartition(".")
        module = self.layers[layer].get_submodule(module_path) if module_path else self.layers[layer]
        return module, local

    def suffixes(self, layer):
        return sorted(n for n, _ in self.layers[layer].named_parameters())

    def name(self, layer, suffix):
        module, local = self._param(layer, suffix)
        return self._names.get(id(getattr(module, local)), f"layers.{layer}.{suffix}")

    def shape(self, layer, suffix):
        module, local = self._param(layer, suffix)
        return tuple(getattr(module, local).shape)

    def read(self, layer, suffix):
        return read_param(*self._param(layer, suffix))

    def role_name(self, role):
        found = self._roles[role]
        return None if found is None else self._names.get(id(getattr(*found)), role)

    def role_shape(self, role):
        found = self._roles[role]
        return None if found is None else tuple(getattr(*found).shape)

    def read_role(self, role):
        return read_param(*self._roles[role])

    def text_config(self):
        config = getattr(self.decoder, "config", None) or getattr(self.model, "config", None)
        return text_config_dict(config.to_dict()) if config is not None else {}

    # ---- writing (the in-place destination) ----
    def write(self, layer, suffix, value, undo: list) -> None:
        write_param(*self._param(layer, suffix), value, undo)

    def write_role(self, role, value, undo: list) -> None:
        write_param(*self._roles[role], value, undo)
        if role == "embed" and self.lm_head_tied() and getattr(*self._roles["embed"]) is not getattr(
                *self._roles["lm_head"]):
            write_param(*self._roles["lm_head"], value, undo)  # offloaded and tied: lm_head reads its own entry

    def lm_head_tied(self) -> bool:
        """lm_head uses the embeddings' weight: one parameter, or, offloaded by accelerate (whose hooks put fresh
        meta parameters in place at a forward, two objects then), as the config's ``tie_word_embeddings`` says."""
        embed, head = self._roles["embed"], self._roles["lm_head"]
        if embed is None or head is None:
            return False
        if getattr(*embed) is getattr(*head):
            return True
        offloaded = _offload_map(*embed) is not None and _offload_map(*head) is not None
        return offloaded and bool(getattr(getattr(self.model, "config", None), "tie_word_embeddings", False))


def _offload_map(module: nn.Module, local: str):
    """(dataset, key) of an accelerate-offloaded parameter, or None for a resident one."""
    hook = getattr(module, "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None) if hook is not None else None
    if weights_map is None or getattr(hook, "offload", False) is False:
        return None
    dataset = getattr(weights_map, "dataset", weights_map)
    return dataset, getattr(weights_map, "prefix", "") + local


def read_param(module: nn.Module, local: str) -> torch.Tensor:
    param = getattr(module, local)
    if param.device.type == "meta":
        found = _offload_map(module, local)
        if found is None:
            raise ValueError(f"{local} of {type(module).__name__} is on the meta device and not offloaded by "
                             "accelerate: there are no weights to merge")
        dataset, key = found
        return dataset[key]
    return param.detach()


def write_param(module: nn.Module, local: str, value: torch.Tensor, undo: list) -> None:
    """Write ``value`` into a parameter, appending to ``undo`` how to put the original back bit-for-bit.

    Resident parameters are written in place (``copy_``; the original is kept as a CPU copy). Offloaded ones
    (accelerate ``device_map`` with "cpu"/"disk", ``cpu_offload``) get the value in the hook's state dict, which it
    reads first: the offload folder on disk is never written, and the undo drops or restores that entry.
    """
    param = getattr(module, local)
    if param.device.type == "meta":
        dataset, key = _offload_map(module, local)
        state = getattr(dataset, "state_dict", dataset)  # a disk loader's in-memory entries, or cpu_offload's dict
        had, old = key in state, state.get(key)
        state[key] = value.to("cpu", old.dtype if old is not None else param.dtype)
        undo.append(lambda: state.__setitem__(key, old) if had else state.pop(key, None))
        return
    with torch.no_grad():
        original = param.detach().to("cpu", copy=True)
        undo.append(lambda: _restore(param, original))
        param.copy_(value.to(param.device, param.dtype))


def _restore(param, original):
    with torch.no_grad():
        param.copy_(original.to(param.device))


def side_of(source, what: str) -> Side | None:
    """A ``Side`` for a model, a checkpoint path, a ``Checkpoint`` or a ``Side`` (None stays None)."""
    if source is None or isinstance(source, Side):
        return source
    if isinstance(source, Checkpoint):
        return CheckpointSide(source, what)
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).exists():
            raise FileNotFoundError(f"{what}: no checkpoint at {os.fspath(source)!r}")
        return CheckpointSide(source, what)
    if isinstance(source, nn.Module):
        return ModelSide(source, what)
    raise TypeError(f"{what} must be a loaded model or a path to a safetensors checkpoint folder, "
                    f"got {type(source).__name__}")


# ---- the plan: what maps to what, checked before any write --------------------------------------------------------
@dataclass
class Plan:
    layers: list[int]
    suffixes: dict[int, list[str]]
    roles: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_tensors(self) -> int:
        return sum(len(s) for s in self.suffixes.values())


CONFIG_CHECKS = (("rope_theta", rope_theta), ("rms_norm_eps", lambda c: c.get("rms_norm_eps")),
                 ("vocab_size", lambda c: c.get("vocab_size")),
                 ("max_position_embeddings", lambda c: c.get("max_position_embeddings")),
                 ("hidden_act", lambda c: c.get("hidden_act")))
REASONING_TOKENS = ("<think>", "</think>")


def compare_configs(dst: Side, others: Iterable[Side]) -> list[str]:
    """Warnings for config values that differ between the MLLM's language model and a source, and for added-token
    tables that disagree (ids used by both for different tokens, ``<think>`` missing from the MLLM)."""
    found = []
    mine = dst.text_config()
    my_tokens = dst.added_tokens()
    for other in others:
        theirs = other.text_config()
        for name, get in CONFIG_CHECKS:
            a, b = get(mine), get(theirs)
            if a is not None and b is not None and a != b:
                found.append(f"config mismatch: {name} is {a!r} in the mllm but {b!r} in the {other.what} model "
                             "(the merged layers were trained for the other value; outputs will differ)")
        tokens = other.added_tokens()
        by_id = {i: t for t, i in my_tokens.items()}
        clashes = sorted(f"{t!r} (id {i}) vs {by_id[i]!r}" for t, i in tokens.items() if i in by_id and by_id[i] != t)
        if clashes:
            found.append(f"special-token clash: the {other.what} tokenizer and the mllm's use the same ids for "
                         f"different tokens: {', '.join(clashes[:5])}")
        missing = [t for t in REASONING_TOKENS if t in tokens and t not in my_tokens]
        if missing and my_tokens:
            found.append(f"special tokens {', '.join(missing)} of the {other.what} tokenizer are not in the mllm's "
                         "tokenizer: the merged model keeps the mllm's tokenizer")
    return found


def make_plan(dst: Side, sources: list[Side], layers: Iterable[int], roles: Iterable[str] = ()) -> Plan:
    """Map every tensor of ``layers`` (and the non-layer ``roles``) of ``dst`` to each source; raise ``ValueError``
    naming the tensor on a missing tensor or a shape mismatch, before anything is written."""
    layers = list(layers)
    for src in sources:
        if src.num_layers != dst.num_layers:
            raise ValueError(f"layer counts differ: the mllm's language model has {dst.num_layers} decoder layers, "
                             f"the {src.what} model {src.num_layers}")
    suffixes = {}
    for layer in layers:
        mine = dst.suffixes(layer)
        for src in sources:
            theirs = src.suffixes(layer)
            if set(mine) != set(theirs):
                only_dst, only_src = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
                raise ValueError(f"decoder layer {layer} has different tensors in the mllm and the {src.what} model: "
                                 f"only in the mllm: {only_dst or 'none'}; only in the {src.what} model: "
                                 f"{only_src or 'none'}")
            for suffix in mine:
                a, b = dst.shape(layer, suffix), src.shape(layer, suffix)
                if a != b:
                    raise ValueError(f"shape mismatch at tensor {dst.name(layer, suffix)!r}: {list(a)} in the mllm, "
                                     f"{list(b)} in the {src.what} model ({src.name(layer, suffix)!r})")
        suffixes[layer] = mine
    roles = list(roles)
    for role in roles:
        a = dst.role_shape(role)
        for src in sources:
            b = src.role_shape(role)
            if a is None or b is None or a != b:
                raise ValueError(f"shape mismatch at tensor {dst.role_name(role)!r} ({role}): "
                                 f"{list(a) if a else 'absent'} in the mllm, {list(b) if b else 'absent'} in the "
                                 f"{src.what} model; non_layer_policy='reasoning' or 'merge' needs identical "
                                 "vocabularies")
    return Plan(layers, suffixes, roles, compare_configs(dst, sources))


# ---- per-layer statistics and per-tensor rules ---------------------------------------------------------------------
CHUNK = 1 << 22
"""Elements per chunk of the fp32 arithmetic (16 MB of fp32): the temporaries never exceed a few chunks."""


def _chunks(*tensors: torch.Tensor, size: int = CHUNK):
    """Aligned flat chunks of same-shaped tensors."""
    flat = [t.reshape(-1) for t in tensors]
    for start in range(0, flat[0].numel(), size):
        yield [t[start:start + size] for t in flat]


def _dot64(x: torch.Tensor, y: torch.Tensor, row: int = 1 << 14) -> float:
    """Σ x·y: fp32 partial sums over rows of 16384 elements, accumulated in fp64."""
    n = x.numel()
    m = n - n % row
    total = 0.0
    if m:
        total += float((x[:m].view(-1, row) * y[:m].view(-1, row)).sum(1).double().sum())
    if n > m:
        total += float((x[m:].double() * y[m:].double()).sum())
    return total


def layer_stats(triples: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[float, float, float]:
    """(a_V, a_R, cos) of one layer from its (V, R, B) tensors: a_t = Σ‖θ_t − θ_0‖² in fp32 math with fp64
    accumulation, cos = ⟨τ_V, τ_R⟩ / √(a_V a_R) (0 when a norm is 0). Chunked: the temporaries stay a few MB."""
    a_v = a_r = dot = 0.0
    for v, r, b in triples:
        r, b = r.to(v.device), b.to(v.device)
        for cv, cr, cb in _chunks(v, r, b):
            base = cb.float()
            tv = torch.sub(cv.float(), base)  # never in place: .float() of an fp32 tensor is the tensor itself
            tr = torch.sub(cr.float(), base)
            a_v += _dot64(tv, tv)
            a_r += _dot64(tr, tr)
            dot += _dot64(tv, tr)
    cos = dot / math.sqrt(a_v * a_r) if a_v > 0 and a_r > 0 else 0.0
    return a_v, a_r, cos


def tensor_seed(seed: int, layer: int, suffix: str) -> int:
    """The seed of DARE's random mask for one tensor: the same in-place and streamed, whatever the key names."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{layer}.{suffix}".encode())) % (2**63)


def combine(rule: str, v: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None, lam_v: float, lam_r: float, *,
            density: float = 0.5, majority_sign_method: str = "total", seed: int = 0) -> torch.Tensor | None:
    """One merged tensor in ``v``'s dtype and on its device, or None when ``rule`` leaves ``v`` unchanged.

    ``frank``/``linear``: ``torch.lerp(V, R, λ_R)`` in fp32 (= θ_0 + λ_V τ_V + λ_R τ_R with λ_V = 1 − λ_R; exactly R
    at λ_R = 1), chunk by chunk; ``task_arithmetic``, ``ties``, ``dare_ties``: θ_0 +
    ``peft.utils.merge_utils.<rule>([τ_V, τ_R], [λ_V, λ_R], ...)`` on the whole tensor (TIES' top-k is per tensor).
    """
    if rule in SUM_TO_ONE:
        if lam_r == 0:
            return None
        out = torch.empty_like(v)
        for cv, cr, co in _chunks(v, r.to(v.device), out):
            co.copy_(torch.lerp(cv.float(), cr.float(), float(lam_r)))
        return out
    from peft.utils import merge_utils  # the optional "merge" extra

    base = b.to(v.device, torch.float32)
    tasks = [v.float() - base, r.to(v.device).float() - base]
    weights = torch.tensor([lam_v, lam_r], dtype=torch.float32, device=v.device)
    if rule == "task_arithmetic":
        delta = merge_utils.task_arithmetic(tasks, weights)
    elif rule == "ties":
        delta = merge_utils.ties(tasks, weights, density, majority_sign_method)
    elif rule == "dare_ties":
        devices = [v.device] if v.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            delta = merge_utils.dare_ties(tasks, weights, density, majority_sign_method)
    else:
        raise ValueError(f"unknown merge rule {rule!r}; rules: {', '.join(RULES)}")
    return (base + delta).to(v.dtype)


# ---- the streamed writer -------------------------------------------------------------------------------------------
def parse_size(size) -> int | None:
    """``max_shard_size`` as bytes: an int, or "500MB" / "5GB" / "2GiB" style strings; None stays None."""
    if size is None or isinstance(size, int):
        return size
    text = str(size).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _nbytes(shape, dtype_name: str) -> int:
    return math.prod(shape) * DTYPES[dtype_name].itemsize


def write_safetensors(path: Path, entries: list[tuple[str, str, tuple[int, ...]]], produce, metadata=None) -> None:
    """Write one safetensors file tensor by tensor: the header from ``entries`` (key, dtype name, shape), then the
    bytes of ``produce(key)`` for each, in order. Only one tensor is in memory at a time."""
    header, offset = {}, 0
    for key, dtype_name, shape in entries:
        size = _nbytes(shape, dtype_name)
        header[key] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = {"__metadata__": metadata or {"format": "pt"}, **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key, dtype_name, shape in entries:
            tensor = produce(key)
            if tensor.dtype != DTYPES[dtype_name] or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"internal error: {key} is {tensor.dtype} {list(tensor.shape)}, "
                                   f"the header says {dtype_name} {list(shape)}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                f.write(data.view(torch.uint8).numpy().data)
            del tensor, data


def shard_layout(ckpt: Checkpoint, max_shard_size: int | None) -> list[tuple[str, list[str]]]:
    """(file name, keys) of the output: the MLLM's own files, or new ``model-0000k-of-0000n`` shards of at most
    ``max_shard_size`` bytes (a tensor larger than that gets a shard of its own)."""
    if max_shard_size is None:
        files: dict[str, list[str]] = {}
        for key, name in ckpt.weight_map.items():
            files.setdefault(name, []).append(key)
        return list(files.items())
    shards, current, size = [], [], 0
    for key in ckpt.keys():
        nbytes = _nbytes(ckpt.shape(key), ckpt.dtype_name(key))
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    if current:
        shards.append(current)
    if len(shards) == 1:
        return [(SAFE_SINGLE, shards[0])]
    n = len(shards)
    return [(f"model-{k + 1:05d}-of-{n:05d}.safetensors", keys) for k, keys in enumerate(shards)]


def stream_merge(mllm, out, produce_for, *, max_shard_size=None) -> dict:
    """Write the MLLM checkpoint ``mllm`` (a ``CheckpointSide``) to ``out`` with each key's tensor from
    ``produce_for(key)`` (None: the MLLM's own tensor, copied as stored). Copies every other file of the folder
    (config, tokenizer, processor, chat template, generation config) unchanged. Returns {"files", "bytes"}."""
    ckpt: Checkpoint = mllm.ckpt
    out = Path(out)
    if out.resolve() == ckpt.folder.resolve():
        raise ValueError("out must differ from the mllm checkpoint folder (the merge never overwrites its input)")
    out.mkdir(parents=True, exist_ok=True)
    layout = shard_layout(ckpt, parse_size(max_shard_size))
    metadata = None
    first = ckpt._open[ckpt.files[0]].metadata()
    if first:
        metadata = dict(first)
    total = 0
    weight_map = {}
    for name, keys in layout:
        entries = [(k, ckpt.dtype_name(k), ckpt.shape(k)) for k in keys]
        total += sum(_nbytes(s, d) for _, d, s in entries)

        def produce(key):
            value = produce_for(key)
            return ckpt.get(key) if value is None else value

        write_safetensors(out / name, entries, produce, metadata)
        weight_map.update({k: name for k in keys})
    if len(layout) > 1 or (max_shard_size is None and ckpt.indexed):
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for item in ckpt.folder.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != SAFE_INDEX \
                and item.suffix not in PICKLE_SUFFIXES:
            shutil.copy2(item, out / item.name)
    return {"files": [name for name, _ in layout], "bytes": total}


def check_out_folder(out) -> None:
    """``out`` must be a folder path, new or holding no weights: a shard or an index left there by an earlier merge
    would sit beside the new files and be loaded in their place (an old index names the old shards)."""
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a folder path, got {type(out).__name__}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out must be a folder; {os.fspath(out)} is a file")
    if path.is_dir():
        weights = sorted(item.name for item in path.iterdir() if item.name.endswith((".safetensors", ".index.json"))
                         or item.suffix in PICKLE_SUFFIXES)
        if weights:
            shown = ", ".join(weights[:3]) + (", ..." if len(weights) > 3 else "")
            raise ValueError(f"out {os.fspath(out)} already holds weights ({shown}); they would be loaded beside or "
                             f"instead of the merged ones: remove them or choose a new folder")


# ---- nograd.merge ----------------------------------------------------------------------------------------------------
def merge(method: str = "frank", /, *, mllm, reasoning, base=None, out, **options) -> dict:
    """Merge ``reasoning`` (and ``base``) into the MLLM checkpoint folder ``mllm``, streamed, writing ``out``.

        report = nograd.merge("frank", mllm="path/A", reasoning="path/B", base="path/C", out="path/out")

    ``mllm`` is a safetensors checkpoint folder; ``reasoning`` and ``base`` are folders or loaded models. The options
    are those of ``nograd.apply(mllm_model, method, ...)`` (``rule``, ``prior``, ``layers``, ...) plus
    ``max_shard_size`` (None keeps the MLLM's shard layout). ``out`` is a new folder or one without weights. Tensors
    are read one at a time, the output is written tensor by tensor under the MLLM checkpoint's own key names, with a
    ``model.safetensors.index.json`` when sharded.
    Returns the report (what ``h.stats`` holds for the in-place merge), plus ``out``, ``files`` and ``bytes``.
    """
    from . import registry

    merging = [name for name, c in registry.classes().items() if hasattr(c, "stream")]
    if not isinstance(method, str) or method.strip().lower() not in merging:  # a typo too: the merge methods listed
        raise ValueError(f"{method!r} is not a merge method; merge methods: {', '.join(merging)}")
    cls = registry.get(method)
    if not isinstance(mllm, (str, os.PathLike)):
        raise TypeError(f"mllm must be the path of a safetensors checkpoint folder, got {type(mllm).__name__}; to "
                        f"merge into a loaded model use nograd.apply(model, {method!r}, ...), then save_pretrained")
    check_out_folder(out)
    config = cls.Config.from_options({**options, "reasoning": reasoning, "base": base})
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return cls.stream(mllm, out, config)


def describe_report(report: dict[str, Any]) -> str:
    """A small text table of a merge report: per layer π_V, a_V, a_R, cos, λ_V, λ_R."""
    lines = [f"rule={report.get('rule')} prior={report.get('prior_source')} merged layers={report.get('layers')} "
             f"tensors merged={report.get('tensors_merged')}"]
    lines.append("layer    pi_v         a_v         a_r     cos   lambda_v  lambda_r")
    for i in range(len(report.get("lambda_r", []))):
        def get(name, fmt):
            values = report.get(name) or []
            value = values[i] if i < len(values) else None
            return format(value, fmt) if isinstance(value, (int, float)) else "-"

        lines.append(f"{i:5d} {get('pi_v', '7.3f')} {get('a_v', '11.4g')} {get('a_r', '11.4g')} {get('cos', '7.3f')} "
                     f"{get('lambda_v', '10.4f')} {get('lambda_r', '9.4f')}")
    for message in report.get("warnings", []):
        lines.append(f"warning: {message}")
    return "\n".join(lines)
