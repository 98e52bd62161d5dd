"""The MM-DiT adapters (SD3, FLUX) against tiny random diffusers transformers and pipelines.

The joint layout is not taken on trust: a key-recording processor is planted on one attention module, the
transformer runs twice with only the text (or only the image) input changed, and the key rows that change are
where that part of the joint sequence sits. Only attention modules whose inputs have not yet mixed text and image
(those of the first block) can be probed this way; a FLUX model without dual-stream blocks puts a single-stream
block first.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
from torch.overrides import TorchFunctionMode

from nograd.errors import UnsupportedModelError
from nograd.patches import adapter_for
from nograd.patches.dit import FluxAdapter, SD3Adapter, transformer_of
from tiny.dit import BUILDERS, COLS, ROWS, TEXT_LEN, build_pipeline, transformer_inputs

VARIANTS = {
    "sd3.5": ("sd3", {}),
    "sd3.0": ("sd3", {"dual_attention_layers": ()}),
    "flux": ("flux", {}),
}
EXPECTED = {
    "sd3": (SD3Adapter, Attention, JointAttnProcessor2_0, "image_first"),
    "flux": (FluxAdapter, FluxAttention, FluxAttnProcessor, "text_first"),
}


class KeyRecorder(TorchFunctionMode):
    """A processor wrapping the installed one that records the key (B, H, S, D) its attention call receives."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.keys = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.keys.append((kwargs["key"] if "key" in kwargs else args[1]).detach().clone())
        return func(*args, **kwargs)

    def __call__(self, attn, *args, **kwargs):
        with self:
            return self.inner(attn, *args, **kwargs)


@contextlib.contextmanager
def recording_keys(modules):
    recorders = [KeyRecorder(module.processor) for module in modules]
    for module, recorder in zip(modules, recorders):
        module.set_processor(recorder)
    try:
        yield recorders
    finally:
        for module, recorder in zip(modules, recorders):
            module.set_processor(recorder.inner)


def changed_positions(keys_a, keys_b) -> list[int]:
    return (keys_a - keys_b).abs().amax(dim=(0, 1, 3)).nonzero().flatten().tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_adapter_structure_matches_config(variant):
    family, overrides = VARIANTS[variant]
    model = BUILDERS[family](**overrides)
    adapter_cls, attention_cls, processor_cls, layout = EXPECTED[family]
    cfg = model.config

    adapter = adapter_for(model)
    assert type(adapter) is adapter_cls and adapter.kind == "dit" and adapter.joint_layout == layout

    if family == "sd3":
        blocks = list(model.transformer_blocks)
        n_attention = cfg.num_layers + len(cfg.dual_attention_layers)
    else:
        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
        n_attention = cfg.num_layers + cfg.num_single_layers
    assert adapter.decoder_layers == blocks and adapter.num_layers == len(blocks)
    assert len(adapter.attention_modules) == n_attention
    assert all(isinstance(module, attention_cls) for module in adapter.attention_modules)
    assert all(module.heads == adapter.num_heads for module in adapter.attention_modules)
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (
        cfg.num_attention_heads,
        cfg.num_attention_heads,
        cfg.attention_head_dim,
    )
    with pytest.raises(UnsupportedModelError):
        adapter.text_model


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_processors_are_keyed_by_module_name_and_follow_changes(family):
    model = BUILDERS[family]()
    adapter = adapter_for(model)
    named = dict(model.named_modules())
    processors = adapter.processors()
    assert list(processors) == list(adapter.named_attention_modules)
    assert [named[name] for name in processors] == adapter.attention_modules
    assert all(type(p) is EXPECTED[family][2] for p in processors.values())

    first = adapter.attention_modules[0]
    with recording_keys([first]) as (recorder,):
        assert next(iter(adapter.processors().values())) is recorder
    assert adapter.processors() == processors


@pytest.mark.parametrize(
    ("family", "overrides", "module_name"),
    [
        ("sd3", {}, "transformer_blocks.0.attn"),
        ("sd3", {}, "transformer_blocks.0.attn2"),
        ("flux", {}, "transformer_blocks.0.attn"),
        ("flux", {"num_layers": 0}, "single_transformer_blocks.0.attn"),
    ],
)
def test_joint_token_spans_match_planted_experiment(family, overrides, module_name):
    model = BUILDERS[family](**overrides)
    adapter = adapter_for(model)
    module = adapter.named_attention_modules[module_name]
    spans = adapter.joint_token_spans(module, TEXT_LEN, ROWS * COLS)

    def keys(**seeds):
        with recording_keys([module]) as (recorder,), torch.no_grad():
            model(**transformer_inputs(family, model, **seeds))
        (key,) = recorder.keys
        return key

    base = keys()
    positions = list(range(base.shape[2]))
    assert len(positions) == max(span.stop for span in spans.values())
    assert changed_positions(base, keys(text_seed=1)) == positions[spans["text"]]
    assert changed_positions(base, keys(image_seed=1)) == positions[spans["image"]]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_every_attention_sequence_has_the_spans_length(family):
    model = BUILDERS[family]()
    adapter = adapter_for(model)
    modules = adapter.attention_modules
    with recording_keys(modules) as recorders, torch.no_grad():
        model(**transformer_inputs(family, model))
    for module, recorder in zip(modules, recorders):
        spans = adapter.joint_token_spans(module, TEXT_LEN, ROWS * COLS)
        assert [key.shape[2] for key in recorder.keys] == [max(span.stop for span in spans.values())]


def test_joint_token_spans_rejects_a_foreign_module():
    adapter = adapter_for(BUILDERS["flux"]())
    with pytest.raises(ValueError):
        adapter.joint_token_spans(BUILDERS["flux"]().transformer_blocks[0].attn, TEXT_LEN, ROWS * COLS)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_image_grid_counts_the_image_tokens_the_transformer_sees(family):
    pipe = build_pipeline(family)
    transformer = transformer_of(pipe)
    assert transformer is pipe.transformer and transformer_of(transformer) is transformer
    adapter = adapter_for(transformer)
    seen = {}

    def first_block_input(block, args, kwargs):
        seen["image_tokens"] = kwargs["hidden_states"].shape[1]

    def transformer_input(model, args, kwargs):
        seen["img_ids"] = kwargs.get("img_ids")

    height, width = 32, 48
    hooks = [
        transformer.transformer_blocks[0].register_forward_pre_hook(first_block_input, with_kwargs=True),
        transformer.register_forward_pre_hook(transformer_input, with_kwargs=True),
    ]
    try:
        pipe("a cat", num_inference_steps=1, height=height, width=width, output_type="pt")
    finally:
        for hook in hooks:
            hook.remove()

    rows, cols = adapter.image_grid(height, width, vae_scale_factor=pipe.vae_scale_factor)
    assert rows * cols == seen["image_tokens"]
    cell = adapter.token_cell(pipe.vae_scale_factor)
    assert (rows, cols) == (height // cell, width // cell) and cell * cell * seen["image_tokens"] <= height * width
    if family == "flux":  # FLUX's image position ids are (0, row, col) of each packed token
        assert (rows, cols) == tuple(int(seen["img_ids"][:, axis].max()) + 1 for axis in (1, 2))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tiny_pipeline_runs_end_to_end(family):
    pipe = build_pipeline(family)
    images = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert images.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all()
