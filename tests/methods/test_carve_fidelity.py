"""CARVE against its spec and the official code: with ``steps="first"`` the task probe still answers in full (spec
§5.1), the probes decode by plain argmax whatever the checkpoint's ``generation_config`` sets (official
``generate_with_attention``) while the final pass keeps it (and a ``generation_config`` or dict outputs the caller
gives it), nothing outside LLaVA-1.5's centre crop (read from the processor's sizes) is kept (§5.2), and
``prompt_style="official"`` builds the official LLaVA-1.5 prompt (§3 Prompts, §5.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import nograd
from nograd.methods.carve_geometry import View, centre_crop_box, covered_pixels, to_pixels
from nograd.methods.carve_regions import select_regions
from tiny.processor import PROCESSORS, image

QUESTION = "What is on the left?"
PROMPT = QUESTION + " Answer the question using a single word or phrase."


def argmax_decode(model, inputs, steps: int) -> torch.Tensor:
    """The official probe's decoding of one prompt: the argmax of the last logits of the whole growing sequence, up
    to ``steps`` tokens, ending after EOS."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos or [])
    for _ in range(steps):
        with torch.no_grad():
            token = model(input_ids=ids, attention_mask=mask, **extra).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        if int(token) in eos:
            break
    return ids[:, inputs["input_ids"].shape[1]:]


def decode(processor, tokens: torch.Tensor) -> str:
    return processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()


def test_steps_first_still_gives_the_task_pass_answer_in_full(carve_models):
    """Only the first step's rows enter the map, but the task pass's text is the baseline answer (spec §5.1)."""
    model, processor = carve_models("llava"), PROCESSORS["llava"]()
    picture = image(70, 42, seed=7)
    with nograd.apply(model, "carve", processor=processor) as handle:
        full = handle.generate(picture, QUESTION)
    with nograd.apply(model, "carve", processor=processor, steps="first") as handle:
        first = handle.generate(picture, QUESTION)
    assert len(full.maps["task"]) > 1 and first.original_text == full.original_text
    assert len(first.maps["task"]) == len(full.maps["task"])


def test_probes_decode_by_plain_argmax_and_the_final_pass_keeps_the_generation_config(carve_models, monkeypatch):
    """A checkpoint's ``generation_config`` (here ``repetition_penalty=1.3``) leaves the probe tokens those of a
    plain argmax loop (the official code); the final pass decodes as ``model.generate`` does with it."""
    model, processor = carve_models("llava"), PROCESSORS["llava"]()
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.3)
    picture = image(70, 42, seed=8)
    with nograd.apply(model, "carve", processor=processor, probe_max_new_tokens=12) as handle:
        out = handle.generate(picture, QUESTION)
        probe = handle.build_inputs([picture], [PROMPT])
        final = handle.build_inputs([picture, out.refined_image], [PROMPT], images_per_text=2)
    with torch.no_grad():
        penalised = model.generate(**probe, max_new_tokens=12, do_sample=False)[:, probe["input_ids"].shape[1]:]
        answer = model.generate(**final, max_new_tokens=32, do_sample=False)[:, final["input_ids"].shape[1]:]
    plain = decode(processor, argmax_decode(model, probe, 12))
    assert plain != decode(processor, penalised)  # the penalty matters on this prompt
    assert out.original_text == plain and out.text == decode(processor, answer)
    assert model.generation_config.repetition_penalty == 1.3


def test_the_final_pass_takes_a_generation_config_and_dict_outputs(carve_models, monkeypatch):
    """A ``generation_config`` given to ``h.generate`` sets the final pass's length and decoding (CARVE's loose
    max_new_tokens / do_sample overrode it: 32 tokens for 3), and ``return_dict_in_generate`` (given, or the model's
    own setting) is read (it crashed indexing the output object)."""
    from transformers import GenerationConfig

    model, processor = carve_models("llava"), PROCESSORS["llava"]()
    picture = image(70, 42, seed=8)
    new_tokens, generate = [], type(model).generate

    def recording(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        new_tokens.append(sequences.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(type(model), "generate", recording)
    config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with nograd.apply(model, "carve", processor=processor, probe_max_new_tokens=4) as handle:
        handle.generate(picture, QUESTION, generation_config=config)
        handle.generate(picture, QUESTION, max_new_tokens=2, return_dict_in_generate=True)
    assert new_tokens[1] <= 3 and new_tokens[3] <= 2  # the final passes (after each probe pass)


def test_select_regions_keeps_no_pixel_the_map_does_not_cover():
    """A 210x90 (21:9) image whose map covers the central 90x90 (43% of the pixels): at top_p=0.6 the uncovered
    pixels (the map's minimum) tied at a whole-image threshold and were kept, the bbox the whole image."""
    width, height, x0 = 210, 90, 60
    view = View(torch.arange(16), 4, 4, (x0, 0, x0 + height, height))
    torch.manual_seed(0)
    saliency = to_pixels(torch.rand(16) + 0.1, [view], (width, height))
    covered = covered_pixels([view], (width, height))
    assert int(covered.sum()) == height * height and bool(covered[:, x0:x0 + height].all())
    for top_p in (0.2, 0.6, 1.0):
        regions = select_regions(saliency, top_p, 2, "paper", valid=covered)
        assert not bool(regions.mask[~covered].any())
        assert x0 <= regions.bbox[0] and regions.bbox[2] <= x0 + height
        assert regions.threshold == pytest.approx(float(np.percentile(saliency[covered].numpy(), 100 * (1 - top_p))),
                                                  rel=1e-6)
    with pytest.raises(ValueError, match="valid"):
        select_regions(saliency, 0.2, valid=torch.zeros(height, width, dtype=torch.bool))


def test_generate_keeps_nothing_outside_the_llava_centre_crop(carve_models):
    """End to end on a 210x90 image (the LLaVA processor resizes it to 65 x 28 and keeps the central 28 x 28: x 58..149)
    at top_p=0.6."""
    model = carve_models("llava")
    picture = image(210, 90, seed=9)
    with nograd.apply(model, "carve", processor=PROCESSORS["llava"](), top_p=0.6, min_regions=2,
                      keep_rule="paper") as handle:
        out = handle.generate(picture, QUESTION)
    assert not out.flat and out.regions >= 1 and bool(out.mask[:, 58:149].any())
    assert not bool(out.mask[:, :58].any()) and not bool(out.mask[:, 149:].any())
    assert 58 <= out.bbox[0] and out.bbox[2] <= 149


@pytest.mark.parametrize("size, resize, crop, box", [
    ((120, 60), {"shortest_edge": 56}, {"height": 28, "width": 28}, (45, 15, 75, 45)),
    ((60, 120), {"shortest_edge": 56}, {"height": 28, "width": 28}, (15, 45, 45, 75)),
    ((210, 90), {"shortest_edge": 28}, {"height": 28, "width": 28}, (58, 0, 149, 90)),  # resized to 65 x 28
    ((57, 56), {"shortest_edge": 28}, {"height": 28, "width": 28}, (0, 0, 57, 56)),  # resized to 28 x 28: no crop
    ((80, 40), {"height": 28, "width": 28}, {"height": 14, "width": 14}, (20, 10, 60, 30)),
])
def test_centre_crop_box_is_what_the_processor_keeps(size, resize, crop, box):
    """The crop of a CLIP processor whose resize (shortest edge S) and crop sizes differ is smaller than the
    min(W, H) square: read from its settings, checked on the processor's own pixels (a ramp image's kept columns)."""
    assert centre_crop_box(size, resize, crop) == box
    if "shortest_edge" in resize:
        processor = PROCESSORS["llava"]().image_processor
        processor.size, processor.crop_size = dict(resize), dict(crop)
        processor.do_normalize = processor.do_rescale = False
        ramp = np.tile(np.arange(size[0], dtype=np.float64) * 255 / max(size[0] - 1, 1), (size[1], 1))
        pixels = processor(Image.fromarray(ramp.astype(np.uint8)).convert("RGB"), return_tensors="pt")
        seen = pixels["pixel_values"][0, 0].double()
        lo, hi = float(seen[:, 0].mean()), float(seen[:, -1].mean())
        step = (box[2] - box[0]) / crop["width"]  # original pixels per resized pixel: the resampling's blur
        assert abs(lo * (size[0] - 1) / 255 - box[0]) <= step and abs(hi * (size[0] - 1) / 255 - (box[2] - 1)) <= step


def test_generate_keeps_nothing_outside_a_smaller_centre_crop(carve_models):
    """A processor resizing the short side to 56 then cropping 28 x 28 sees x 45..75, y 15..45 of a 120x60 image:
    nothing outside is kept (the min(W, H) square was assumed)."""
    model = carve_models("llava")
    processor = PROCESSORS["llava"]()
    processor.image_processor.size = {"shortest_edge": 56}
    with nograd.apply(model, "carve", processor=processor, top_p=0.6, min_regions=2, keep_rule="paper") as handle:
        out = handle.generate(image(120, 60, seed=1), QUESTION)
    assert out.regions >= 1 and bool(out.mask[15:45, 45:75].any())
    outside = out.mask.clone()
    outside[15:45, 45:75] = False
    assert not bool(outside.any())


def test_official_prompt_style_builds_the_official_llava_prompt(carve_models):
    """``"<image>\\nUSER: {q} {suffix}\\nASSISTANT:"``, and ``"<image><image>\\n..."`` for the two-image final
    pass (spec §3, Prompts); the chat template stays the default; other families refuse it."""
    model, processor = carve_models("llava"), PROCESSORS["llava"]()
    picture = image(70, 42, seed=10)
    official = "\nUSER: What is on the left? Answer the question using a single word or phrase.\nASSISTANT:"
    with nograd.apply(model, "carve", processor=processor, prompt_style="official") as handle:
        built = [handle.build_inputs([picture] * count, [PROMPT], images_per_text=count) for count in (1, 2)]
        assert handle.generate(picture, QUESTION).mask.shape == (42, 70)  # the official prompts end to end
    with nograd.apply(model, "carve", processor=processor) as handle:
        chat = handle.build_inputs([picture], [PROMPT])
    for count, inputs in zip((1, 2), built):
        expected = processor(text="<image>" * count + official, images=[picture] * count, return_tensors="pt")
        assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert not torch.equal(chat["input_ids"], built[0]["input_ids"])
    with pytest.raises(ValueError, match="prompt_style='official' is not allowed; expected 'chat' on a qwen2_vl"):
        nograd.apply(carve_models("qwen2_vl"), "carve", processor=PROCESSORS["qwen2_vl"](), prompt_style="official")
    with pytest.raises(ValueError, match="prompt_style='plain' is not allowed; expected one of 'chat', 'official'"):
        nograd.apply(model, "carve", processor=processor, prompt_style="plain")
    assert not nograd.attached(model)
