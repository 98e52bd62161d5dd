"""``nograd.tiny``, the public tiny models: every text family and every VLM family (with its real offline processor)
builds and generates, and a VLM's processor writes exactly as many image tokens as the model's features fill."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import nograd
from nograd.tiny import llms


@pytest.mark.parametrize("family", sorted(llms.BUILDERS))
def test_every_text_family_generates(family):
    model, tokenizer = nograd.tiny.llm(family=family, layers=2)
    inputs = tokenizer(["The capital", "of France is"], return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("family", nograd.tiny.VLM_FAMILIES)
def test_every_vlm_family_generates_from_its_processor(family):
    model, processor = nograd.tiny.vlm(family, layers=2)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[[nograd.tiny.image(60, 40)]], return_tensors="pt")
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert image_tokens > 0 and out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert image_tokens == sum(len(grid.positions) for grid in
                               nograd.patches.adapter_for(model).image_grids(inputs["input_ids"], **{
                                   k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}))


@pytest.mark.parametrize("family", nograd.tiny.VLM_FAMILIES)
def test_every_vlm_sees_its_image(family):
    """Another image gives other logits (Gemma3's projector, left at zero by transformers' init, gave every image
    the same zero features), and no weight matrix is all zero."""
    model, processor = nograd.tiny.vlm(family, layers=2)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    logits = []
    for seed in (0, 1):
        inputs = processor(text=[prompt], images=[[nograd.tiny.image(60, 40, seed=seed)]], return_tensors="pt")
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
    assert (logits[0] - logits[1]).abs().max() > 1e-3
    assert [name for name, p in model.named_parameters() if p.dim() >= 2 and not p.any()] == []


def test_an_unknown_family_is_named():
    with pytest.raises(KeyError, match="no tiny VLM with a processor for 'nope'"):
        nograd.tiny.vlm("nope")


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "qwen3_vl", "internvl"])
def test_tiny_processors_refuse_videos_and_say_how_to_build_them(family):
    _, processor = nograd.tiny.vlm(family, layers=2)
    frames = [nograd.tiny.image(28, 28), nograd.tiny.image(28, 28, seed=1)]
    with pytest.raises(NotImplementedError, match="encodes images only .* nograd.tiny.vlms.make_video_inputs"):
        processor(text=["a video"], videos=[frames], return_tensors="pt")


@pytest.mark.parametrize("family", nograd.tiny.VLM_FAMILIES)
def test_tiny_processors_save_and_reload_or_refuse_before_writing(family, tmp_path):
    """A tiny processor saved with ``save_pretrained`` reloads through ``AutoProcessor`` to the same inputs; one built
    without its video processor (which needs torchvision) refuses before writing a file, rather than leave a folder
    that reloads as a bare tokenizer."""
    from transformers import AutoProcessor

    _, processor = nograd.tiny.vlm(family, layers=2)
    if isinstance(processor, nograd.tiny.processors.NoVideo):
        with pytest.raises(NotImplementedError, match="no video processor and cannot be saved"):
            processor.save_pretrained(tmp_path)
        assert list(tmp_path.iterdir()) == []
        return
    processor.save_pretrained(tmp_path)
    try:
        reloaded = AutoProcessor.from_pretrained(tmp_path)
    except (ImportError, ValueError) as error:  # Mistral3's PixtralProcessor; Idefics3's on transformers 5.17
        if "torchvision" not in str(error).lower() or importlib.util.find_spec("torchvision") is not None:
            raise
        pytest.skip(f"this transformers loads {type(processor).__name__} only with torchvision")
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    image = nograd.tiny.image(40, 28)
    inputs = [p(images=[image], text=p.apply_chat_template(chat, add_generation_prompt=True), return_tensors="pt")
              for p in (processor, reloaded)]
    assert type(reloaded) is type(processor) and inputs[0].keys() == inputs[1].keys()
    assert all(torch.equal(inputs[0][key], inputs[1][key]) for key in inputs[0])


@pytest.mark.parametrize("family", nograd.tiny.VLM_FAMILIES)
def test_image_text_to_text_pipeline_runs_on_every_tiny_vlm(family):
    """The pipeline decodes with the processor's ``post_process_image_text_to_text`` (the tiny Qwen2-VL's own)."""
    import transformers

    model, processor = nograd.tiny.vlm(family, layers=2)
    pipe = transformers.pipeline("image-text-to-text", model=model, processor=processor)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    picture = nograd.tiny.image(60, 40)
    out = pipe(images=picture, text=processor.apply_chat_template(chat, add_generation_prompt=True),
               max_new_tokens=2, return_full_text=False)
    assert isinstance(out[0]["generated_text"], str)
    chat[0]["content"][0]["image"] = picture  # the chat form: the processor's apply_chat_template tokenizes it
    assert pipe(text=chat, max_new_tokens=2, return_full_text=False)[0]["generated_text"] == out[0]["generated_text"]
