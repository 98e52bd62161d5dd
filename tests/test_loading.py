"""Real loading paths: from_pretrained from a folder, accelerate device maps, transformers pipelines."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import nograd
from checks import attn_names, same_state, snapshot


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def test_from_pretrained_model(saved_llama, padded_batch):
    model = AutoModelForCausalLM.from_pretrained(saved_llama).eval()
    ids, mask = padded_batch
    saved, plain = snapshot(model), logits(model, ids, mask)
    with nograd.apply(model, "zerotuning", gamma=2.0):
        assert not torch.equal(logits(model, ids, mask), plain)
    assert torch.equal(logits(model, ids, mask), plain) and same_state(model, saved)


def test_device_map_with_offloaded_layer(saved_llama, padded_batch, tmp_path):
    """accelerate hooks (here a layer offloaded to disk) sit around the modules; the attention path is unaffected."""
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(saved_llama, device_map=device_map, offload_folder=tmp_path).eval()
    reference = AutoModelForCausalLM.from_pretrained(saved_llama).eval()
    assert hasattr(model.model.layers[1], "_hf_hook")
    ids, mask = padded_batch
    plain = logits(model, ids, mask)
    with nograd.apply(model, "zerotuning", gamma=2.0), nograd.apply(reference, "zerotuning", gamma=2.0):
        torch.testing.assert_close(logits(model, ids, mask), logits(reference, ids, mask), atol=1e-6, rtol=0)
    assert torch.equal(logits(model, ids, mask), plain)


def test_device_map_auto(saved_llama, padded_batch):
    model = AutoModelForCausalLM.from_pretrained(saved_llama, device_map="auto").eval()
    ids, mask = padded_batch
    plain = logits(model, ids, mask)
    with nograd.apply(model, "zerotuning", gamma=2.0):
        assert not torch.equal(logits(model, ids, mask), plain)
    assert torch.equal(logits(model, ids, mask), plain)


def test_text_generation_pipeline(saved_llama):
    tokenizer = AutoTokenizer.from_pretrained(saved_llama)
    model = AutoModelForCausalLM.from_pretrained(saved_llama).eval()
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["w5 w6 w7 w8", "w9 w10"]
    kwargs = dict(max_new_tokens=4, do_sample=False, return_full_text=False, batch_size=2)
    plain = pipe(prompts, **kwargs)
    names, saved = attn_names(model), snapshot(model)
    with nograd.apply(pipe, "zerotuning", gamma=4.0) as handle:
        assert handle.model is pipe.model and handle.processor is tokenizer
        assert nograd.attached(pipe) == [handle]
        steered = pipe(prompts, **kwargs)
        assert handle.stats["biased_calls"] > 0
        ids = tokenizer(prompts, return_tensors="pt", padding=True)
        direct = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    texts = [tokenizer.decode(row[ids["input_ids"].shape[1]:], skip_special_tokens=True) for row in direct]
    assert [out[0]["generated_text"].strip() for out in steered] == [t.strip() for t in texts]
    assert pipe(prompts, **kwargs) == plain
    assert attn_names(model) == names and same_state(model, saved)
