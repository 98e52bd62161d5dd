"""PAINT and the shared VLM score edit on batches: rows that ``generate`` repeats for beams and
``num_return_sequences`` get their prompt's margins; measured head gains are each row's own, from the current prompt
(equal alone and in a padded batch, run after run, with and without the KV cache); a text-only row of a mixed batch
is left as the plain model computes it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import nograd

EDIT = dict(alpha=3.0, beta=2.0)
"""Large margins, so the edit (and the head gains) move the tiny model's logits well above the tolerances."""
GREEDY = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def tiny_vlm():
    """``get(family)``: (model, processor) of a tiny VLM with a processor, built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = nograd.tiny.vlm(family, layers=4)
            cache[family][1].tokenizer.padding_side = "left"
        return cache[family]

    return get


def chat(processor, text, image=True):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


TEXTS = ["Describe the picture in detail please.", "What?"]
IMAGES = [dict(width=56, height=56, seed=1), dict(width=56, height=42, seed=2)]


def prompts(processor, rows):
    """Processor outputs for the prompts ``rows`` (indices into TEXTS / IMAGES), left-padded."""
    images = [nograd.tiny.image(IMAGES[r]["width"], IMAGES[r]["height"], seed=IMAGES[r]["seed"]) for r in rows]
    return processor(images=images, text=[chat(processor, TEXTS[r]) for r in rows], padding=True, return_tensors="pt")


def generate(model, inputs, **kwargs):
    out = model.generate(**inputs, **{**GREEDY, **kwargs})
    return out.sequences[:, -GREEDY["max_new_tokens"]:], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
@pytest.mark.parametrize("expand", [dict(num_beams=2), dict(num_beams=2, num_return_sequences=2),
                                    dict(do_sample=True, num_return_sequences=2)])
def test_repeated_rows_get_their_prompts_margins(tiny_vlm, family, expand):
    """generate encodes the B images, then repeats each prompt row k times: the first step's logits of every copy
    (the prefill's last row, edited with the margins) equal the greedy run's of its prompt, and the selection is the
    prompts'."""
    model, processor = tiny_vlm(family)
    inputs = prompts(processor, [0, 1])
    with nograd.apply(model, "paint", **EDIT) as handle:
        _, greedy = generate(model, inputs)
        selection = handle.stats["selection"]
        torch.manual_seed(0)
        _, expanded = generate(model, inputs, **expand)
        k = expanded.shape[0] // 2
        torch.testing.assert_close(expanded[:, 0], greedy[:, 0].repeat_interleave(k, dim=0), atol=1e-5, rtol=0)
        picked = [(s["local"].tolist(), s["summary"].tolist()) for s in handle.stats["selection"]]
        want = [(s["local"].tolist(), s["summary"].tolist()) for s in selection]
        # transformers 5.24 encodes each prompt's images once, 5.17 every copy's: the same selection either way
        assert picked in (want, [pick for pick in want for _ in range(k)])
    with torch.no_grad():
        plain = model(**inputs).logits[:, -1]
    assert (greedy[:, 0] - plain).abs().max() > 1e-3


def test_identical_token_rows_with_other_images_keep_their_own_margins(tiny_vlm):
    """Two rows with the same tokens but different images are two prompts, not one repeated: each row equals its
    prompt alone."""
    model, processor = tiny_vlm("llava")
    images = [nograd.tiny.image(56, 56, seed=1), nograd.tiny.image(56, 56, seed=5)]
    text = chat(processor, TEXTS[0])
    batch = processor(images=images, text=[text, text], return_tensors="pt")
    with nograd.apply(model, "paint", **EDIT), torch.no_grad():
        both = model(**batch).logits[:, -1]
        alone = [model(**processor(images=[image], text=[text], return_tensors="pt")).logits[0, -1]
                 for image in images]
    torch.testing.assert_close(both, torch.stack(alone), atol=1e-5, rtol=0)
    assert (alone[0] - alone[1]).abs().max() > 1e-3


def gains_from(shares, heads, head_ratio=0.5, head_gain_max=2.0):
    """(L, H) gains of ``heads`` from (L, H) visual shares, written out (``PAINTConfig.heads``)."""
    if heads == "topk":
        top = shares.topk(max(1, round(head_ratio * shares.shape[1])), dim=-1).indices
        return torch.zeros_like(shares).scatter_(-1, top, 1.0)
    ratio = shares / shares.mean(dim=-1, keepdim=True)
    return (ratio if heads == "proportional" else 1 / ratio).clamp(0, head_gain_max)


@pytest.mark.parametrize("heads", ["proportional", "inverse", "topk"])
def test_measured_head_gains_are_each_rows_own_on_the_current_prompt(tiny_vlm, heads, tmp_path):
    """Measured gains: a generate equals the same edit with the gain table written out from the shares it measured
    (once, at the prefill, before each layer's edit); a padded batch row equals its prompt alone; a generate after
    other prompts equals it on a fresh handle (the shares are reset, not accumulated); without the KV cache it equals
    the cached run."""
    model, processor = tiny_vlm("llava")
    batch = prompts(processor, [0, 1])
    alone = [prompts(processor, [row]) for row in (0, 1)]
    fresh, modulated = [], []
    for row, inputs in enumerate(alone):
        with nograd.apply(model, "paint", heads=heads, **EDIT) as handle:
            fresh.append(generate(model, inputs))
            modulated.append({key: handle.stats[key] for key in ("heads_edited", "heads_modulated")})
            handle.save_head_stats(str(tmp_path / f"row{row}.safetensors"))
        table = gains_from(load_file(str(tmp_path / f"row{row}.safetensors"))["visual_share"], heads)
        assert (table != 1).any()
        with nograd.apply(model, "paint", heads=table, **EDIT):
            tokens, logits = generate(model, inputs)
        assert torch.equal(tokens, fresh[row][0])
        torch.testing.assert_close(logits, fresh[row][1], atol=1e-5, rtol=0)
    with nograd.apply(model, "paint", heads=heads, **EDIT) as handle:
        tokens, logits = generate(model, batch)
        # each row's own counts of edited and modulated heads, as alone (a union over the batch's rows was reported)
        for key in ("heads_edited", "heads_modulated"):
            assert handle.stats[key] == {layer: [modulated[0][key][layer][0], modulated[1][key][layer][0]]
                                         for layer in modulated[0][key]}
        if heads == "topk":  # the top half of the heads edited alike, the others not at all
            assert all(counts == [2, 2] for counts in handle.stats["heads_edited"].values())
            assert all(counts == [0, 0] for counts in handle.stats["heads_modulated"].values())
        again = [generate(model, inputs) for inputs in alone]
        uncached = [generate(model, inputs, use_cache=False) for inputs in alone]
    for row, (want_tokens, want_logits) in enumerate(fresh):
        assert torch.equal(tokens[row], want_tokens[0])
        torch.testing.assert_close(logits[row], want_logits[0], atol=1e-4, rtol=0)
        assert torch.equal(again[row][0], want_tokens) and torch.equal(again[row][1], want_logits)
        assert torch.equal(uncached[row][0], want_tokens)
        torch.testing.assert_close(uncached[row][1], want_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, options", [("clearsight", dict(enhance=2.0, suppress=0.5)),
                                             ("clearsight", dict(enhance=2.0, suppress=0.5, rows="prompt_end")),
                                             ("pai", dict(alpha=0.5)), ("paint", EDIT)])
def test_text_only_row_of_a_mixed_batch_is_untouched(tiny_vlm, method, options):
    """A batch of a text-only prompt and an image prompt: the text-only row equals the plain model on that prompt
    alone (every position), the image row its prompt alone under the method."""
    model, processor = tiny_vlm("llava")
    image = nograd.tiny.image(56, 56, seed=1)
    text_only, with_image = chat(processor, "Tell me a long story about cats.", image=False), chat(processor, "What?")
    batch = processor(images=[image], text=[text_only, with_image], padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        plain = model(**processor(text=[text_only], return_tensors="pt")).logits[0]
        with nograd.apply(model, method, **options):
            mixed = model(**batch).logits
            edited = model(**processor(images=[image], text=[with_image], return_tensors="pt")).logits[0]
        unedited = model(**processor(images=[image], text=[with_image], return_tensors="pt")).logits[0]
    torch.testing.assert_close(mixed[0][real[0]], plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1][real[1]], edited, atol=1e-5, rtol=0)
    assert (edited[-1] - unedited[-1]).abs().max() > 1e-4
