"""Every method on a CUDA device: the tiny models and inputs of the CPU tests, moved to the GPU, give the CPU's
results (fp32), and bf16 runs without NaN. Only here run the paths that CUDA alone takes: ``auto`` choosing the Triton
kernels, tensors made on the inputs' device, host values handed to device tensors. Skipped without CUDA;
``bench/gpu.sh`` runs it on a lent GPU (with diffusers from carried wheels for the DiT cases)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import nograd

CUDA = os.environ.get("NOGRAD_TEST_DEVICE", "cuda")
"""The device compared with the CPU; ``NOGRAD_TEST_DEVICE=cpu`` dry-runs these tests where no GPU is."""
pytestmark = pytest.mark.skipif(CUDA == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

DECODER_CASES = [
    ("llama", "zerotuning", {}),
    ("llama", "act", {}),
    ("llava", "pai", {}),
    ("llava", "pai", {"cfg_gamma": 1.1}),
    ("llava", "paint", {}),
    ("llava", "clearsight", {}),
    ("llava", "pyramiddrop", {}),
    ("llava", "fastv", {}),
    ("qwen2_vl", "paint", {}),
    ("qwen2_vl", "pyramiddrop", {}),
    ("gemma3", "pai", {}),
]


def decoder_case(family: str):
    """(model, inputs): a tiny model of ``family`` (8 decoder layers) and a two-row, left-padded batch."""
    if family == "llama":
        model, _ = nograd.tiny.llm(layers=8)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(4, 100, (2, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        return model, {"input_ids": ids, "attention_mask": mask}
    from nograd.tiny import vlm_families, vlms

    module = vlm_families if family in vlm_families.FAMILIES else vlms
    model = module.build(family, text_layers=8) if module is vlm_families else nograd.tiny.build(family, text_layers=8)
    return model, module.make_inputs(family, model)


def on(inputs: dict, device, dtype=None) -> dict:
    return {k: v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)
            for k, v in inputs.items()}


def run(model, inputs: dict, method: str, options: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(prefill logits, the scores of 4 greedy new tokens, stats) under ``method``."""
    with nograd.apply(model, method, **options) as handle, torch.no_grad():
        logits = model(**inputs).logits[:, -1].float()
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        return logits, torch.stack(out.scores, 1).float(), dict(handle.stats)


@pytest.mark.parametrize("family, method, options", DECODER_CASES)
def test_decoder_methods_on_cuda_equal_the_cpu(family, method, options):
    model, inputs = decoder_case(family)
    want = run(model, inputs, method, options)
    gpu = copy.deepcopy(model).to(CUDA)
    got = run(gpu, on(inputs, CUDA), method, options)
    if "kept" in want[2]:  # token dropping: the same tokens ranked out (else the logits cannot agree)
        assert [[k.tolist() for k in stage] for stage in got[2]["kept"]] == \
            [[k.tolist() for k in stage] for stage in want[2]["kept"]]
    torch.testing.assert_close(got[0].cpu(), want[0], atol=2e-3, rtol=0)
    torch.testing.assert_close(got[1].cpu(), want[1], atol=2e-3, rtol=0)
    half = copy.deepcopy(model).to(CUDA, torch.bfloat16)
    logits, scores, _ = run(half, on(inputs, CUDA, torch.bfloat16), method, options)
    assert torch.isfinite(logits).all() and not torch.isnan(scores).any()


def test_carve_on_cuda_equals_the_cpu():
    vlm, processor = nograd.tiny.vlm("llava")
    image = nograd.tiny.image(70, 42)
    options = dict(processor=processor, probe_max_new_tokens=4, max_new_tokens=4)
    with nograd.apply(vlm, "carve", **options) as carve:
        want = carve.generate(image, "What is written on the sign?")
    gpu = copy.deepcopy(vlm).to(CUDA)
    with nograd.apply(gpu, "carve", **options) as carve:
        got = carve.generate(image, "What is written on the sign?")
    torch.testing.assert_close(got.saliency.cpu(), want.saliency, atol=1e-4, rtol=1e-3)
    assert torch.equal(got.mask.cpu(), want.mask)


def test_frank_on_cuda_equals_the_cpu():
    mllm, _, reasoning, base = nograd.tiny.trio()
    options = dict(prior=[1.0, 0.7, 0.3, 0.0] + [0.0] * (len(mllm.get_decoder().layers) - 4))
    cpu = copy.deepcopy(mllm)
    with nograd.apply(cpu, "frank", reasoning=reasoning, base=base, **options):
        want = {k: v.clone() for k, v in cpu.state_dict().items()}
    gpu = copy.deepcopy(mllm).to(CUDA)
    with nograd.apply(gpu, "frank", reasoning=reasoning.to(CUDA), base=base.to(CUDA), **options):
        for name, value in gpu.state_dict().items():
            torch.testing.assert_close(value.cpu(), want[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("method, options", [("softpag", dict(heads={(0, 0): 1.0, (0, 1): 0.5, (1, 0): 1.0})),
                                             ("softpag", dict(heads={0: [0, 1]}, mode="image_identity")),
                                             ("softpag", dict(heads={0: [0, 1]}, path="reference")),
                                             ("pag", dict(layers=[1]))])
def test_dit_guidance_on_cuda_equals_the_cpu(family, method, options):
    pytest.importorskip("diffusers")
    from nograd.tiny.dits import BUILDERS, transformer_inputs

    model = BUILDERS[family]()
    inputs = transformer_inputs(family, model)
    with nograd.apply(model, method, **options) as handle, torch.no_grad(), handle.perturbed_only():
        want = model(**inputs)[0]
    gpu = copy.deepcopy(model).to(CUDA)
    with nograd.apply(gpu, method, **options) as handle, torch.no_grad(), handle.perturbed_only():
        got = gpu(**on(inputs, CUDA))[0]
    torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_refam_on_cuda_equals_the_cpu(family):
    pytest.importorskip("diffusers")
    pipe = getattr(nograd.tiny, family)()
    image = nograd.tiny.image(64, 48)
    with nograd.apply(pipe, "refam", resolution=32) as refam:
        want = refam.ground(image, "the man in the red jacket")
    pipe.to(CUDA)
    with nograd.apply(pipe, "refam", resolution=32) as refam:
        got = refam.ground(image, "the man in the red jacket")
    torch.testing.assert_close(torch.as_tensor(got.heatmap).cpu(), torch.as_tensor(want.heatmap), atol=1e-3, rtol=0)
