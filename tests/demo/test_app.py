"""The demo without a browser: the app builds with its four tabs, and each tab's computation, called directly on the
built-in tiny models, gives the plain and the method outputs, heatmaps the size of the image, masks, kept tokens,
stats and timings."""

from __future__ import annotations

import pytest
import torch

import nograd
from demo import compare
from nograd import tiny

QUESTION = "What is in the picture?"


def enlarged(image):
    """The display size of ``image`` (small images are enlarged by an integer factor)."""
    return compare._enlarge(image).size


def test_app_builds_with_one_tab_per_family_and_binds_to_localhost():
    gr = pytest.importorskip("gradio")
    from demo import app

    blocks = app.build_app()
    tabs = [block.label for block in blocks.blocks.values() if isinstance(block, gr.Tab)]
    assert tabs == ["VLM", "LLM", "Diffusion", "Merge"]
    options = app.launch_options(app.parse_args([]))
    assert options["server_name"] == "127.0.0.1" and options["share"] is False and options["max_file_size"]
    assert app.launch_options(app.parse_args(["--share", "--host", "0.0.0.0"]))["share"] is True


def test_vlm_carve_side_by_side():
    picture = tiny.image(70, 42)
    r = compare.vlm_compare("", "carve", picture, QUESTION, 2)
    assert r["label"] == tiny.LABEL and isinstance(r["plain_text"], str) and isinstance(r["method_text"], str)
    assert r["plain_heat"].size == r["method_heat"].size == enlarged(picture)  # heatmaps over the whole image
    captions = [caption for _, caption in r["gallery"]]
    assert captions[0].startswith("CARVE mask") and "refined" in captions[1]
    assert r["gallery"][0][0].size == enlarged(picture)
    assert r["stats"]["passes"] >= 2 and set(r["timing"]) == {"plain_s", "method_s"}



def test_carve_token_options_are_held_to_the_demo_cap(monkeypatch):
    seen = {}
    apply = compare.nograd.apply

    def spy(model, method, **options):
        seen.update(options)
        return apply(model, method, **options)

    monkeypatch.setattr(compare.nograd, "apply", spy)
    compare.vlm_compare("", "carve", tiny.image(70, 42), QUESTION, 2, {"max_new_tokens": 10**6})
    assert seen["max_new_tokens"] == compare.MAX_NEW_TOKENS and seen["probe_max_new_tokens"] == 2


def test_vlm_pyramiddrop_draws_the_kept_tokens_of_every_stage():
    picture = tiny.image(56, 56, 1)
    r = compare.vlm_compare("", "pyramiddrop", picture, QUESTION, 2)
    stats = r["stats"]
    assert len(r["gallery"]) == len(stats["boundaries"]) == 3
    for (overlay, caption), count in zip(r["gallery"], stats["visual_tokens"][0][1:]):
        assert overlay.size == enlarged(picture) and f": {count} of 16" in caption
    assert stats["flops"]["ratio"] < 1 and r["method_heat"] is None and r["plain_heat"] is not None


class Progress(list):
    """Records the progress calls; empty, it is falsy, as a gr.Progress is."""

    def __call__(self, fraction, desc=None):
        self.append((fraction, desc))


def test_vlm_score_edit_method_has_its_own_heatmap():
    picture = tiny.image(56, 56, 1)
    progress = Progress()
    r = compare.vlm_compare("", "pai", picture, QUESTION, 2, {"alpha": 0.5}, progress)
    assert [desc for _, desc in progress] == ["loading the model", "plain model", "pai", "done"]
    assert r["plain_heat"].size == r["method_heat"].size == enlarged(picture)
    assert r["stats"]["edited_calls"] > 0


def test_the_read_out_is_the_models_own_attention():
    model, tokenizer = tiny.llm()
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with compare.last_row_attention(model) as sink, torch.no_grad():
        model(**inputs)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    assert sorted(sink["rows"]) == [2, 3]  # the later half of the 4 layers
    for layer, row in sink["rows"].items():
        torch.testing.assert_close(row, attentions[layer][:, :, -1].mean(dim=1), atol=1e-5, rtol=0)
    assert not nograd.attached(model)


def test_llm_zerotuning_moves_attention_to_the_first_token():
    prompt = "The capital of France is"
    r = compare.llm_compare("", "zerotuning", prompt, 4, {"gamma": 4.0})
    plain, steered = r["plain_attention"], r["method_attention"]
    assert [t for t, _ in plain] == [t for t, _ in steered] == list(prompt)  # one character per token
    assert steered[0][1] == 1.0 and sum(s for _, s in steered[1:]) < sum(s for _, s in plain[1:])
    assert r["stats"]["biased_calls"] > 0 and isinstance(r["method_text"], str)


def test_diffusion_tab():
    pytest.importorskip("diffusers")
    r = compare.diffusion_compare("", "softpag", "a red car", None, 1)
    assert r["plain_image"].size == r["method_image"].size == (256, 256)
    assert r["stats"]["heads_touched"] == 5 and r["stats"]["perturbed_calls"] == 1
    assert r["stats"]["mean_abs_change"] > 0 and len(r["gallery"]) == 1  # the guidance changed the image
    picture = tiny.image(48, 32, 2)
    g = compare.diffusion_compare("", "refam", "the red car", picture, 1)
    assert g["method_image"].size == enlarged(picture) and len(g["gallery"]) == 2 and g["stats"]["grounds"] == 1


def test_merge_tab():
    r = compare.merge_compare(tiny.image(56, 56, 3), QUESTION, {"rule": "linear", "lambda_r": 0.5}, max_new_tokens=2)
    assert r["table"]["layer"] == list(range(8)) and r["table"]["lambda_r"] == [0.5] * 8
    assert isinstance(r["plain_text"], str) and isinstance(r["method_text"], str)


def test_inputs_are_checked_with_clear_messages(monkeypatch):
    with pytest.raises(ValueError, match="upload an image"):
        compare.check_image(None)
    monkeypatch.setattr(compare, "MAX_SIDE", 100)
    for size in ((120, 20), (20, 120)):  # a side too long, whatever the area (a 5000 x 10 strip passed)
        with pytest.raises(ValueError, match="accepts up to 100 x 100 pixels"):
            compare.check_image(tiny.image(*size))
    assert compare.check_image(tiny.image(100, 3)).size == (100, 3)
    assert enlarged(tiny.image(100, 3)) == (100, 3)  # a thin image is not enlarged past MAX_SIDE
    with pytest.raises(ValueError, match="JSON object"):
        compare.parse_options("gamma=2")
    with pytest.raises(ValueError, match="could not load"):
        compare.load("llm", "/nonexistent/model")
    assert compare.parse_options(' {"gamma": 1.5} ') == {"gamma": 1.5} and compare.parse_options("") == {}


def test_a_method_missing_from_the_build_is_named_not_faked(monkeypatch):
    from demo import app

    monkeypatch.setitem(compare.FAMILIES, "Merge", ("frank", "no_such_method"))
    assert compare.available("Merge") == ["frank"] and compare.missing("Merge") == ["no_such_method"]
    assert "Not available in this build of nograd: no_such_method" in app._not_available("Merge")
    assert "not available" in compare.method_doc("no_such_method")


def test_a_model_folder_loads_from_safetensors_only(tmp_path):
    model, tokenizer = tiny.llm(seed=3)
    model.save_pretrained(tmp_path / "safe")
    tokenizer.save_pretrained(tmp_path / "safe")
    r = compare.llm_compare(str(tmp_path / "safe"), "act", "The capital of France is", 2)
    assert r["label"] == str(tmp_path / "safe") and r["stats"]["sinks"]
    model.config.save_pretrained(tmp_path / "pickled")  # the same weights as a pickle: refused, never unpickled
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    tokenizer.save_pretrained(tmp_path / "pickled")
    with pytest.raises(ValueError, match="could not load"):
        compare.load("llm", str(tmp_path / "pickled"))


def test_the_vlm_tab_loads_a_saved_folder_with_its_processor(tmp_path):
    """A local folder (what a hub id resolves to) loads through AutoModelForImageTextToText / AutoProcessor: the same
    weights and the same answer as the model that was saved."""
    model, processor = tiny.vlm(seed=4)
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    loaded, loaded_processor, label = compare.load("vlm", str(tmp_path / "llava"))
    assert label == str(tmp_path / "llava") and type(loaded) is type(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    picture = tiny.image(56, 56, 5)
    inputs = compare.vlm_inputs(processor, picture, QUESTION)
    assert torch.equal(compare.vlm_inputs(loaded_processor, picture, QUESTION)["input_ids"], inputs["input_ids"])
    r = compare.vlm_compare(str(tmp_path / "llava"), "fastv", picture, QUESTION, 2)
    assert r["label"] == str(tmp_path / "llava") and r["stats"]["kept"] and r["stats"]["kv_bytes_saved"] > 0


def test_the_diffusion_tab_loads_a_saved_pipeline_folder(tmp_path):
    pytest.importorskip("diffusers")
    pipe = tiny.sd3()
    pipe.save_pretrained(tmp_path / "sd3")
    loaded, _, label = compare.load_pipeline(str(tmp_path / "sd3"))
    assert label == str(tmp_path / "sd3") and type(loaded) is type(pipe)
    saved = pipe.transformer.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in loaded.transformer.state_dict().items())
    r = compare.diffusion_compare(str(tmp_path / "sd3"), "pag", "a red car", None, 1, {"layers": [0]})
    assert r["label"] == str(tmp_path / "sd3") and r["stats"]["perturbed_calls"] == 1


@pytest.mark.parametrize("family, method", [("idefics3", "carve"), ("internvl", "carve"), ("gemma3", "paint"),
                                            ("mistral3", "pyramiddrop"), ("qwen3_vl", "fastv")])
def test_a_tiny_family_is_picked_with_tiny_colon(family, method):
    """``tiny:<family>`` in the model box runs the tab on that family's tiny model and real offline processor."""
    r = compare.vlm_compare(f"tiny:{family}", method, tiny.image(60, 40), QUESTION, 2,
                            options={"layer": 3} if method == "fastv" else None)
    assert r["label"] == f"{tiny.LABEL} ({family})" and r["stats"]
    assert r["plain_heat"].size == enlarged(tiny.image(60, 40))
    if method in ("pyramiddrop", "fastv"):  # kept tokens drawn per stage instead of a heatmap
        assert r["method_heat"] is None and r["gallery"] and r["gallery"][0][0].size == enlarged(tiny.image(60, 40))
    else:
        assert r["method_heat"].size == enlarged(tiny.image(60, 40))
    with pytest.raises(ValueError, match="no tiny VLM with a processor for 'nope'"):
        compare.load("vlm", "tiny:nope")
    with pytest.raises(ValueError, match="no tiny LLM for 'nope'"):
        compare.load("llm", "tiny:nope")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_diffusion_tab_takes_a_tiny_family(family):
    pytest.importorskip("diffusers")
    r = compare.diffusion_compare(f"tiny:{family}", "softpag", "a red car", None, 1)
    assert r["label"] == f"{tiny.LABEL} ({family})" and r["stats"]["perturbed_calls"] == 1
    with pytest.raises(ValueError, match="the tiny diffusion families are sd3, flux"):
        compare.load_pipeline("tiny:nope")


def test_json_layer_keys_reach_the_text_and_vlm_tabs():
    """JSON object keys are strings: {"2": [0, 3]} is ACT's {2: [0, 3]} in the LLM and VLM tabs too."""
    options = compare.parse_options('{"heads": {"2": [0, 3]}}')
    r = compare.llm_compare("", "act", "The capital of France", 1, options)
    assert r["stats"]["layers"] == [2]
    v = compare.vlm_compare("", "act", tiny.image(40, 40), QUESTION, 1, options)
    assert v["stats"]["layers"] == [2]
