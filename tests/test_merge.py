"""The streamed merge (``nograd.merge``), the name mapping across MLLM families, and the peer rules."""

from __future__ import annotations

import copy
import importlib
import json
import shutil

import pytest
import torch
import transformers as tf
from safetensors import safe_open

import nograd
import tiny
from checks import same_state, snapshot
from nograd.tiny.vlm_families import noisy
from tiny import vlm
from tiny.trio import make_trio

M = importlib.import_module("nograd.merge")
LAYERS = 4
T = dict(vlm.TEXT)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


@pytest.fixture(scope="module")
def saved_trio(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trio")
    mllm, reasoning, base = make_trio(LAYERS)
    mllm.save_pretrained(folder / "mllm")
    reasoning.save_pretrained(folder / "reasoning", max_shard_size="100KB")
    base.save_pretrained(folder / "base")
    return folder, mllm, reasoning, base


def keys_of(folder):
    ckpt = M.Checkpoint(folder)
    return set(ckpt.keys())


def test_rotary_buffers_saved_in_older_checkpoints_are_not_weights(saved_trio, tmp_path):
    """Older checkpoints saved the rotary ``inv_freq`` buffer inside each layer: a reasoning folder with them was
    refused ("different tensors"); they are neither compared nor merged, and an MLLM's are carried over."""
    from safetensors.torch import load_file, save_file

    folder, mllm, reasoning, base = saved_trio
    options = dict(prior="exp")
    nograd.merge("frank", mllm=folder / "mllm", reasoning=folder / "reasoning", base=folder / "base",
                 out=tmp_path / "plain", **options)
    for name in ("mllm", "reasoning"):
        shutil.copytree(folder / name, tmp_path / name)
        shard = next((tmp_path / name).glob("*.safetensors"))
        tensors = load_file(shard)
        up = next(k for k in tensors if k.endswith("layers.0.mlp.up_proj.weight"))
        prefix = up.removesuffix("0.mlp.up_proj.weight")
        tensors.update({f"{prefix}{i}.self_attn.rotary_emb.inv_freq": torch.full((4,), 7.0) for i in range(LAYERS)})
        save_file(tensors, shard, metadata={"format": "pt"})
        if (tmp_path / name / "model.safetensors.index.json").exists():
            index = json.loads((tmp_path / name / "model.safetensors.index.json").read_text())
            index["weight_map"].update({k: shard.name for k in tensors if k.endswith("inv_freq")})
            (tmp_path / name / "model.safetensors.index.json").write_text(json.dumps(index))
    nograd.merge("frank", mllm=tmp_path / "mllm", reasoning=tmp_path / "reasoning", base=folder / "base",
                 out=tmp_path / "out", **options)
    plain, out = M.Checkpoint(tmp_path / "plain"), M.Checkpoint(tmp_path / "out")
    buffers = {k for k in out.keys() if k.endswith("inv_freq")}
    assert len(buffers) == LAYERS and set(out.keys()) - buffers == set(plain.keys())
    assert all(torch.equal(out.get(k), plain.get(k)) for k in plain.keys())
    assert all(torch.equal(out.get(k), torch.full((4,), 7.0)) for k in buffers)


def test_streamed_equals_in_place_and_loads(saved_trio, tmp_path):
    folder, mllm, reasoning, base = saved_trio
    options = dict(prior=[1.0, 0.7, 0.3, 0.0])
    model = copy.deepcopy(mllm)
    with nograd.apply(model, "frank", reasoning=reasoning, base=base, **options) as h:
        in_place, stats = snapshot(model), dict(h.stats)
    report = nograd.merge("frank", mllm=folder / "mllm", reasoning=folder / "reasoning", base=folder / "base",
                          out=tmp_path / "out", **options)
    assert report["lambda_r"] == stats["lambda_r"] and report["layers"] == [1, 2, 3]
    assert report["files"] == ["model.safetensors"]
    assert keys_of(tmp_path / "out") == keys_of(folder / "mllm")  # the names save_pretrained wrote
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "generation_config.json").exists()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    loaded = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert same_state(loaded, in_place)
    inputs = vlm.make_inputs("qwen2_5_vl", loaded, batch=1)
    out = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_sharded_output_with_index(saved_trio, tmp_path):
    folder, mllm, reasoning, base = saved_trio
    report = nograd.merge("frank", mllm=folder / "mllm", reasoning=reasoning, base=base, out=tmp_path / "out",
                          prior="exp", max_shard_size="150KB")
    assert len(report["files"]) > 2
    index = json.loads((tmp_path / "out" / M.SAFE_INDEX).read_text())
    assert set(index["weight_map"]) == keys_of(folder / "mllm")
    assert index["metadata"]["total_size"] == report["bytes"]
    model = copy.deepcopy(mllm)
    nograd.apply(model, "frank", reasoning=reasoning, base=base, prior="exp")
    loaded = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert same_state(loaded, snapshot(model))


def test_mllm_unchanged_when_lambda_r_is_zero(saved_trio, tmp_path):
    folder, mllm, reasoning, base = saved_trio
    nograd.merge("frank", mllm=folder / "mllm", reasoning=folder / "reasoning", out=tmp_path / "out",
                 rule="linear", lambda_r=0.0)
    a, b = (folder / "mllm" / "model.safetensors").read_bytes(), (tmp_path / "out" / "model.safetensors").read_bytes()
    assert a == b


@pytest.mark.parametrize("options, error, match", [
    (dict(device=True), TypeError, r"option device=True .* a torch\.device, or a CUDA index"),
    (dict(device="gpu"), ValueError, r"option device='gpu' .* 'cpu', 'cuda' or 'cuda:1'"),
    (dict(max_shard_size=0), ValueError, r"option max_shard_size=0 .* a positive int \(bytes\) or a size"),
    (dict(max_shard_size=True), TypeError, r"option max_shard_size=True .* '5GB'"),
])
def test_bad_options_are_refused_before_writing(saved_trio, tmp_path, options, error, match):
    folder, mllm, reasoning, base = saved_trio
    with pytest.raises(error, match=match):
        nograd.merge("frank", mllm=folder / "mllm", reasoning=reasoning, base=base, out=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_out_holding_weights_is_refused(saved_trio, tmp_path):
    # an earlier sharded merge in out: its index would point from_pretrained at its old shards beside a new single file
    folder, mllm, reasoning, base = saved_trio
    out = tmp_path / "out"
    nograd.merge("frank", mllm=folder / "mllm", reasoning=reasoning, base=base, out=out, max_shard_size="150KB")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"already holds weights \(model-00001-of-.*\.safetensors, .*, \.\.\.\)"):
        nograd.merge("frank", mllm=folder / "mllm", reasoning=reasoning, base=base, out=out, rule="linear")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(ValueError, match=r"already holds weights \(model\.safetensors\)"):  # the reasoning LLM's own
        nograd.merge("frank", mllm=folder / "mllm", reasoning=reasoning, base=base, out=folder / "base")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("kept")  # a folder without weights is fine
    nograd.merge("frank", mllm=folder / "mllm", reasoning=reasoning, base=base, out=tmp_path / "notes")
    assert (tmp_path / "notes" / "README.md").read_text() == "kept"


def test_pickle_checkpoints_are_refused(saved_trio, tmp_path):
    folder, mllm, reasoning, base = saved_trio
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pytorch_model.bin").write_bytes(b"not loaded")
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="never loads pickle"):
        nograd.merge("frank", mllm=folder / "mllm", reasoning=tmp_path / "bad", base=folder / "base",
                     out=tmp_path / "out")
    with pytest.raises(ValueError, match="never loads pickle"):
        nograd.merge("frank", mllm=tmp_path / "bad", reasoning=folder / "reasoning", base=folder / "base",
                     out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_the_tensor_and_writes_nothing(saved_trio, tmp_path):
    folder, mllm, reasoning, base = saved_trio
    other = tiny.build("qwen2", vocab_size=160, num_hidden_layers=LAYERS, max_position_embeddings=512,
                       rms_norm_eps=1e-5, intermediate_size=96)
    with pytest.raises(ValueError, match=r"shape mismatch at tensor 'model\.layers\.0\.mlp\.down_proj\.weight'"):
        nograd.merge("frank", mllm=folder / "mllm", reasoning=other, base=base, out=tmp_path / "out")
    shallow = tiny.build("qwen2", vocab_size=160, num_hidden_layers=2, max_position_embeddings=512)
    with pytest.raises(ValueError, match="layer counts differ"):
        nograd.merge("frank", mllm=folder / "mllm", reasoning=shallow, base=base, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for method in ("zerotuning", "frnak"):  # a typo lists the merge methods, not every method
        with pytest.raises(ValueError, match=f"^'{method}' is not a merge method; merge methods: frank$"):
            nograd.merge(method, mllm=folder / "mllm", reasoning=reasoning, out=tmp_path / "out")


@pytest.mark.parametrize("rule", ["task_arithmetic", "ties", "dare_ties"])
def test_peer_rules_are_peft_merge_utils(saved_trio, tmp_path, rule):
    from peft.utils import merge_utils

    folder, mllm, reasoning, base = saved_trio
    options = dict(rule=rule, weights=(0.8, 0.6), **(dict(density=0.5) if "ties" in rule else {}),
                   **(dict(seed=3) if rule == "dare_ties" else {}))
    model = copy.deepcopy(mllm)
    with nograd.apply(model, "frank", reasoning=reasoning, base=base, **options) as h:
        assert h.stats["layers"] == list(range(LAYERS))
        merged = snapshot(model)
        layer, suffix = 1, "mlp.up_proj.weight"
        v = mllm.get_decoder().layers[layer].mlp.up_proj.weight.detach()
        r = reasoning.model.layers[layer].mlp.up_proj.weight.detach()
        b = base.model.layers[layer].mlp.up_proj.weight.detach()
        weights = torch.tensor([0.8, 0.6])
        if rule == "task_arithmetic":
            delta = merge_utils.task_arithmetic([v - b, r - b], weights)
        elif rule == "ties":
            delta = merge_utils.ties([v - b, r - b], weights, 0.5, "total")
        else:
            torch.manual_seed(M.tensor_seed(3, layer, suffix))
            delta = merge_utils.dare_ties([v - b, r - b], weights, 0.5, "total")
        assert torch.equal(model.get_decoder().layers[layer].mlp.up_proj.weight, b + delta)
    nograd.merge("frank", mllm=folder / "mllm", reasoning=folder / "reasoning", base=folder / "base",
                 out=tmp_path / "out", **options)
    loaded = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert same_state(loaded, merged)


# ---- name mapping across families --------------------------------------------------------------------------------
def _family_models():
    qwen3_text = dict(T, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "mrope_section": [2, 3, 3]})
    return {
        "qwen2_5_vl": lambda: tiny.build("qwen2_5_vl"),
        "qwen2_vl": lambda: tiny.build("qwen2_vl"),
        "llava": lambda: tiny.build("llava"),
        "llava_onevision": lambda: tiny.build("llava_onevision"),
        "qwen3_vl": lambda: tf.Qwen3VLForConditionalGeneration._from_config(tf.Qwen3VLConfig(
            text_config=qwen3_text, image_token_id=150, video_token_id=151, vision_start_token_id=152,
            vision_end_token_id=153, vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                                        patch_size=7, spatial_merge_size=2, temporal_patch_size=2,
                                                        out_hidden_size=64, deepstack_visual_indexes=[0]))),
        "internvl": lambda: tf.InternVLForConditionalGeneration._from_config(tf.InternVLConfig(
            text_config=tf.Qwen2Config(**T), image_token_id=150,
            vision_config=dict(VISION, image_size=[28, 28], patch_size=[7, 7]))),
        "mistral3": lambda: tf.Mistral3ForConditionalGeneration._from_config(tf.Mistral3Config(
            text_config=tf.MistralConfig(**T), image_token_index=150,
            vision_config=dict(VISION, image_size=28, patch_size=7, head_dim=16))),
        "gemma3": lambda: tf.Gemma3ForConditionalGeneration._from_config(tf.Gemma3Config(
            text_config=tf.Gemma3TextConfig(**T, head_dim=16), mm_tokens_per_image=4, image_token_index=150,
            vision_config=dict(VISION, image_size=28, patch_size=7))),
    }


DISK_PREFIX = {"qwen2_5_vl": "model.layers.", "qwen2_vl": "model.layers.", "qwen3_vl": "model.language_model.layers.",
               "llava": "language_model.model.layers.", "llava_onevision": "language_model.model.layers.",
               "internvl": "language_model.model.layers.", "mistral3": "language_model.model.layers.",
               "gemma3": "language_model.model.layers."}


@pytest.mark.parametrize("family", sorted(DISK_PREFIX))
def test_family_mapping_round_trip(family, tmp_path):
    """Each family's checkpoint (as save_pretrained writes it) maps 1:1 to its in-memory decoder; merging another
    copy's decoder in (λ_R = 1) writes the MLLM's own key names, and from_pretrained reloads it exactly."""
    torch.manual_seed(0)
    mllm = _family_models()[family]().eval()
    other = copy.deepcopy(mllm)
    noisy(M.decoder_of(other).layers, 0.05, 7)
    mllm.save_pretrained(tmp_path / "mllm")
    side, memory = M.CheckpointSide(tmp_path / "mllm", "mllm"), M.ModelSide(mllm, "mllm")
    assert side.prefix == DISK_PREFIX[family] and side.num_layers == memory.num_layers == 2
    for layer in range(2):
        assert side.suffixes(layer) == memory.suffixes(layer)
        assert all(side.shape(layer, s) == memory.shape(layer, s) for s in memory.suffixes(layer))
    assert memory.name(0, "mlp.down_proj.weight") == "model.language_model.layers.0.mlp.down_proj.weight"
    report = nograd.merge("frank", mllm=tmp_path / "mllm", reasoning=other, out=tmp_path / "out", rule="linear",
                          lambda_r=1.0)
    assert report["tensors_merged"] == 2 * len(memory.suffixes(0))
    assert keys_of(tmp_path / "out") == keys_of(tmp_path / "mllm")
    loaded = type(mllm).from_pretrained(tmp_path / "out").eval()
    want = {n: p for n, p in other.state_dict().items()}
    mine = mllm.state_dict()
    for name, tensor in loaded.state_dict().items():
        decoder_layer = ".layers." in name and "language_model" in name
        assert torch.equal(tensor, want[name] if decoder_layer else mine[name]), name


def test_text_llm_maps_onto_llava(tmp_path):
    """A text Llama's checkpoint (``model.layers.{i}.``) pairs with LLaVA's language model."""
    mllm = tiny.build("llava")
    text = tiny.build("llama", vocab_size=160, num_hidden_layers=2, max_position_embeddings=512)
    text.save_pretrained(tmp_path / "text")
    side = M.CheckpointSide(tmp_path / "text", "reasoning")
    plan = M.make_plan(M.ModelSide(mllm, "mllm"), [side], range(2), M.ROLES)
    assert side.prefix == "model.layers." and plan.num_tensors == 2 * 9 and plan.warnings == []
    assert side.role_name("lm_head") == "lm_head.weight"


def test_streamed_copy_of_the_text_model_gives_its_logits(saved_trio, tmp_path):
    """Streamed, π_V ≡ 0 with the reasoning LLM's embeddings, norm and lm_head (on-disk names of Qwen2.5-VL and
    Qwen2 differ only by the layout): the reloaded MLLM's text-only logits are the text model's."""
    folder, mllm, reasoning, base = saved_trio
    report = nograd.merge("frank", mllm=folder / "mllm", reasoning=folder / "reasoning", base=folder / "base",
                          out=tmp_path / "out", prior=[0.0] * LAYERS, non_layer_policy="reasoning")
    assert report["non_layer"] == ["embed", "norm", "lm_head"] and report["lambda_r"] == [1.0] * LAYERS
    loaded = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reasoning(ids).logits)


def test_streamed_merge_policy_equals_in_place_and_needs_the_same_added_tokens(saved_trio, tmp_path):
    """``non_layer_policy="merge"`` streamed gives the in-place tensors; two checkpoints whose tokenizers give one id
    to different added tokens are refused before anything is written (their embedding rows are different tokens)."""
    folder, mllm, reasoning, base = saved_trio
    options = dict(prior=[1.0, 0.7, 0.3, 0.0], non_layer_policy="merge")
    model = copy.deepcopy(mllm)
    with nograd.apply(model, "frank", reasoning=reasoning, base=base, **options) as h:
        in_place, stats = snapshot(model), dict(h.stats)
    report = nograd.merge("frank", mllm=folder / "mllm", reasoning=folder / "reasoning", base=folder / "base",
                          out=tmp_path / "out", **options)
    assert report["non_layer"] == stats["non_layer"] == ["norm", "lm_head"]  # layer 0 keeps the MLLM's: so does embed
    assert same_state(tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out"), in_place)
    sources = {}
    for name, token in (("mllm", "<image>"), ("reasoning", "<think>")):
        sources[name] = tmp_path / name
        shutil.copytree(folder / name, sources[name])
        (sources[name] / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 150, "content": token}]}))
    with pytest.raises(ValueError, match=r"non_layer_policy='merge' needs identical added-token tables.*'<image>'"):
        nograd.merge("frank", mllm=sources["mllm"], reasoning=sources["reasoning"], base=base, out=tmp_path / "o2",
                     **options)
    assert not (tmp_path / "o2").exists()
    with pytest.warns(UserWarning, match="special-token clash"):  # 'reasoning' warns, as before
        nograd.merge("frank", mllm=sources["mllm"], reasoning=sources["reasoning"], base=base, out=tmp_path / "o2",
                     prior=options["prior"], non_layer_policy="reasoning")


def test_streamed_prior_needs_a_loaded_model(saved_trio, tmp_path):
    from nograd.methods.frank import attention_prior

    folder, mllm, reasoning, base = saved_trio
    with pytest.raises(ValueError, match="attention_prior"):
        nograd.merge("frank", mllm=folder / "mllm", reasoning=reasoning, base=base, out=tmp_path / "out",
                     prior="attention", calibration={"input_ids": torch.zeros(1, 2, dtype=torch.long)})
    inputs = vlm.make_inputs("qwen2_5_vl", mllm)
    with pytest.warns(UserWarning, match="flat"):
        prior = attention_prior(mllm, inputs)
    assert len(prior["r"]) == LAYERS and len(prior["pi_v"]) == LAYERS
    report = nograd.merge("frank", mllm=folder / "mllm", reasoning=reasoning, base=base, out=tmp_path / "out",
                          prior=prior["pi_v"])
    assert report["pi_v"] == prior["pi_v"] and report["prior_source"] == "given"
