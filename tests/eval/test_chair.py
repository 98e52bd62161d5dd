"""CHAIR scorer, its CLI and the captioning harness, on a synthetic COCO-style annotation set (no COCO data)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from fractions import Fraction as F
from pathlib import Path

import pytest

from nograd.eval import GroundTruth, UnknownImagesError, caption_objects, is_repetitive, score, singularize, words
from nograd.eval.__main__ import ORDERS, load_captions, main, parse_option, parser, select_images

# ---- the synthetic data set -------------------------------------------------------------------------------------
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"},
              {"id": 58, "name": "hot dog"}, {"id": 67, "name": "dining table"}, {"id": 70, "name": "toilet"},
              {"id": 88, "name": "teddy bear"}]
GT = {  # image id -> instance categories
    1: ["person", "dog", "dining table", "person"],
    2: ["car", "person"],
    3: ["hot dog", "teddy bear"],
    4: ["dog"],
    5: ["toilet"],
    6: ["person"],
}
CAPTION_ANNOTATIONS = {"annotations": [
    {"image_id": 4, "caption": "A puppy catches a Frisbee in the park."},  # adds frisbee to image 4's ground truth
    {"image_id": 4, "caption": "A dog jumps."},
]}
CAPTIONS = {
    # women -> person, puppy -> dog, "dining table" one object, dogs -> dog again: 4 mentions, 3 objects, all true.
    # 14 words.
    1: "Two women and a puppy sit at a dining table. The dogs look happy.",
    # the same sentence 3x (repetitive); man/car true, fire hydrant hallucinated: 9 mentions (3 hallucinated),
    # 3 objects (1 hallucinated). 10 words x 3 = 30.
    2: ("A man drives a red car past a fire hydrant. A man drives a red car past a fire hydrant. "
        "A man drives a red car past a fire hydrant."),
    # "hot dogs" -> hot dog (no dog), "teddy bears" -> teddy bear (no bear), cell phone hallucinated:
    # 3 mentions (1 hallucinated), 3 objects (1 hallucinated). 13 words.
    3: "Hot dogs on a plate next to teddy bears and a cell phone.",
    # dog true; frisbee true only through the caption annotations. 2 mentions, 2 objects. 5 words.
    4: "A dog with a frisbee.",
    # "toilet seat" -> toilet; the second "seat" is dropped because "toilet" occurs: 2 mentions of toilet, 1 object,
    # no chair. 13 words.
    5: "A toilet seat is up and the seat of the toilet is clean.",
    # empty: no mention, not hallucinated, 0 words, its 1 GT object counts for recall.
    6: "",
}
# By hand:
#   CHAIR_S = 2/6 (captions 2, 3)
#   CHAIR_I = hallucinated mentions / mentions = (3 + 1) / (4 + 9 + 3 + 2 + 2 + 0) = 4/20
#   CHAIR_I once per caption = (1 + 1) / (3 + 3 + 3 + 2 + 1 + 0) = 2/12
#   recall = recalled / GT = (3 + 2 + 2 + 2 + 1 + 0) / (3 + 2 + 2 + 2 + 1 + 1) = 10/11   (image 4: dog, frisbee)
#   precision = recalled / distinct mentioned = 10/12 = 5/6
#   F1 = 2 * 5/6 * 10/11 / (5/6 + 10/11) = (100/66) / (115/66) = 20/23
#   length = (14 + 30 + 13 + 5 + 13 + 0) / 6 = 75/6 = 12.5
#   repetition = 1/6 (caption 2)
#   distinct-2: bigrams 13 + 29 + 12 + 4 + 12 + 0 = 70; distinct: 13 (c1) + 10 (c2: the 9 of one sentence and
#   "hydrant a") + 12 (c3) + 4 (c4) + 12 (c5) - 1 ("and a" in c1 and c3) = 50 -> 50/70 = 5/7
EXPECTED = dict(chair_s=F(2, 6), chair_i=F(4, 20), chair_i_unique=F(2, 12), recall=F(10, 11), precision=F(5, 6),
                f1=F(20, 23), mean_length=F(75, 6), repetition_rate=F(1, 6), distinct_2=F(5, 7))
COUNTS = dict(n_captions=6, n_mentions=20, n_hallucinated_mentions=4, n_objects=12, n_hallucinated_objects=2,
              n_gt_objects=11, n_recalled=10)


def instances(gt=GT):
    names = {c["name"]: c["id"] for c in CATEGORIES}
    return {"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in gt],
            "annotations": [{"id": n, "image_id": i, "category_id": names[c]}
                            for n, (i, c) in enumerate((i, c) for i, cs in gt.items() for c in cs)],
            "categories": CATEGORIES}


@pytest.fixture
def files(tmp_path):
    (tmp_path / "instances.json").write_text(json.dumps(instances()))
    (tmp_path / "captions_ann.json").write_text(json.dumps(CAPTION_ANNOTATIONS))
    with open(tmp_path / "captions.jsonl", "w") as f:  # the official format: JSONL of {"image_id", "caption"}
        for image_id, caption in CAPTIONS.items():
            f.write(json.dumps({"image_id": image_id, "caption": caption}) + "\n")
    return tmp_path


def assert_expected(metrics: dict):
    for key, value in {**EXPECTED, **COUNTS}.items():
        assert metrics[key] == pytest.approx(float(value), abs=1e-12), key


# ---- caption reading --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Two women and three men", [("woman", "person"), ("man", "person")]),
    ("puppies, ponies, kittens and calves", [("puppy", "dog"), ("pony", "horse"), ("kitten", "cat"),
                                            ("calf", "cow")]),
    ("hot dogs and teddy bears", [("hot dog", "hot dog"), ("teddy bear", "teddy bear")]),
    ("two cell phones", [("cell phone", "cell phone")]),  # phones -> phone, not the typo entry "phon"
    ("wine glasses, baseball gloves, sports balls", [("wine glass", "wine glass"),
                                                    ("baseball glove", "baseball glove"),
                                                    ("sports ball", "sports ball")]),
    ("a stop sign by the fire hydrant", [("stop sign", "stop sign"), ("fire hydrant", "fire hydrant")]),
    ("a baby elephant and an adult giraffe", [("elephant", "elephant"), ("giraffe", "giraffe")]),  # no person
    ("a baby on a bed", [("baby", "person"), ("bed", "bed")]),
    ("passengers board the passenger train", [("passenger", "person"), ("train", "train")]),
    ("the train tracks", []),  # "train track" is no train
    ("a man in a bow tie", [("man", "person"), ("tie", "tie")]),
    ("a chair near the toilet, and the seat", [("chair", "chair"), ("toilet", "toilet")]),  # seat dropped
    ("a seat on the bus", [("seat", "chair"), ("bus", "bus")]),
    ("a hot-dog stand", []),  # hyphenated: one token, as with NLTK's tokeniser
    ("a man skiing", [("man", "person")]),  # verbs are not lemmatised (PAINT's WordNet reading would add skis)
    ("the TV, a laptop computer and a Television", [("tv", "tv"), ("laptop computer", "laptop"),
                                                    ("television", "tv")]),
    ("the dog's bowl", [("dog", "dog"), ("bowl", "bowl")]),
])
def test_caption_objects(text, expected):
    assert caption_objects(text) == expected


def test_singularize_only_reduces_to_known_words():
    assert [singularize(w) for w in "dogs buses glasses knives mice geese ties horses doggies".split()] == \
        "dog bus glass knife mouse goose tie horse doggie".split()
    # known words stay; unknown words are never changed, so no new match can appear
    assert [singularize(w) for w in "bus skis scissors people children tennis boxes is this".split()] == \
        "bus skis scissors people children tennis boxes is this".split()
    # "es" comes off only after s, x, z, ch, sh: skies, manes and vanes are no skis, men or vans
    assert [singularize(w) for w in "skies manes vanes benches".split()] == "skies manes vanes bench".split()
    assert caption_objects("Two horses with flowing manes stand under blue skies near vanes.") == \
        [("horse", "horse")]


def test_words_and_repetition():
    assert words("The dog's bowl, isn't it?") == ["the", "dog", "bowl", "isn", "it"]
    assert is_repetitive("A cat. A cat! a  cat") and not is_repetitive("A cat. A cat. A dog.")
    assert not is_repetitive("")


# ---- the scorer -------------------------------------------------------------------------------------------------
def test_score_hand_computed(files):
    truth = GroundTruth.from_coco(files / "instances.json", files / "captions_ann.json")
    assert truth.objects[4] == {"dog", "frisbee"} and truth.objects[1] == {"person", "dog", "dining table"}
    assert truth.file_names[3] == "COCO_val2014_000000000003.jpg"
    result = score(CAPTIONS, truth)
    assert_expected(result.metrics())
    by_id = {c.image_id: c for c in result.captions}
    assert by_id[1].mentions == [("woman", "person"), ("puppy", "dog"), ("dining table", "dining table"),
                                 ("dog", "dog")]
    assert by_id[1].objects == ["person", "dog", "dining table"] and by_id[1].hallucinated == []
    assert by_id[2].hallucinated == ["fire hydrant"] and by_id[2].hallucinated_mentions == 3
    assert by_id[2].repetitive and by_id[2].chair_s and by_id[2].length == 30
    assert by_id[3].objects == ["hot dog", "teddy bear", "cell phone"] and by_id[3].hallucinated == ["cell phone"]
    assert by_id[5].mentions == [("toilet", "toilet"), ("toilet", "toilet")]
    assert by_id[6].mentions == [] and not by_id[6].chair_s and by_id[6].length == 0 and by_id[6].gt_objects == [
        "person"]
    assert by_id[4].recalled == ["dog", "frisbee"]


def test_score_without_caption_annotations(files):
    # frisbee is then hallucinated in caption 4: CHAIR_S 3/6, CHAIR_I 5/20, recall 9/10 (image 4: GT {dog})
    result = score(CAPTIONS, GroundTruth.from_coco(str(files / "instances.json")))
    assert result.chair_s == pytest.approx(3 / 6) and result.chair_i == pytest.approx(5 / 20)
    assert result.recall == pytest.approx(9 / 10) and result.precision == pytest.approx(9 / 12)
    assert [c.hallucinated for c in result.captions if c.image_id == 4] == [["frisbee"]]


def test_score_inputs_and_errors():
    truth = {1: {"dog"}}
    # pairs with duplicates and string ids are accepted
    result = score([("1", "A dog."), (1, "A cat.")], truth)
    assert result.n_captions == 2 and result.chair_s == 0.5
    with pytest.raises(UnknownImagesError, match="1 caption"):
        score({2: "A dog."}, truth)
    assert score({2: "A dog."}, truth, strict=False).chair_s == 1.0  # the official scorers' behaviour
    empty = score({}, truth)
    assert empty.n_captions == 0 and empty.chair_s == 0 and empty.f1 == 0 and empty.distinct_2 == 0
    with pytest.raises(ValueError, match="not in the COCO synonym table"):
        GroundTruth.from_coco({"images": [], "annotations": [], "categories": [{"id": 1, "name": "lamp"}]})


# ---- the score CLI ----------------------------------------------------------------------------------------------
def test_score_cli_subprocess(files):
    out = files / "scores.json"
    proc = subprocess.run(
        [sys.executable, "-m", "nograd.eval", "score", "--captions", str(files / "captions.jsonl"),
         "--annotations", str(files / "instances.json"), "--captions-annotations", str(files / "captions_ann.json"),
         "--out", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "CHAIR_S %" in proc.stdout and "33.3" in proc.stdout and "Distinct-2" in proc.stdout
    data = json.loads(out.read_text())
    (run,) = data["runs"].values()
    assert_expected(run["metrics"])
    assert len(run["per_caption"]) == 6 and run["per_caption"][2]["hallucinated"] == ["cell phone"]


def test_score_cli_formats(files, capsys):
    # an {image_id: caption} object (string keys) scores the same as the JSONL list
    (files / "captions.json").write_text(json.dumps({str(k): v for k, v in CAPTIONS.items()}))
    out = files / "scores.json"
    assert main(["score", "--captions", str(files / "captions.json"), "--annotations", str(files / "instances.json"),
                 "--captions-annotations", str(files / "captions_ann.json"), "--out", str(out)]) == 0
    assert_expected(json.loads(out.read_text())["runs"]["captions"]["metrics"])
    # a chair output file: each run becomes a column, with a delta column for two runs
    runs = {"plain": {"captions": [{"image_id": k, "caption": v} for k, v in CAPTIONS.items()]},
            "method": {"captions": [{"image_id": 1, "caption": "A dog."}]}}
    (files / "chair.json").write_text(json.dumps({"runs": runs}))
    assert list(load_captions(str(files / "chair.json"))) == ["plain", "method"]
    capsys.readouterr()
    assert main(["score", "--captions", str(files / "chair.json"), "--annotations", str(files / "instances.json"),
                 "--captions-annotations", str(files / "captions_ann.json")]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["metric", "plain", "method", "delta"]
    # unknown image ids: a clear error, exit status 2
    (files / "bad.json").write_text(json.dumps([{"image_id": 99, "caption": "A dog."}]))
    assert main(["score", "--captions", str(files / "bad.json"), "--annotations", str(files / "instances.json")]) == 2
    assert "allow-unknown-images" in capsys.readouterr().err


@pytest.mark.parametrize("captions, annotations, match", [
    (None, "instances.json", r"--captions: .*No such file"),
    ("{not json", "instances.json", "--captions: "),
    ('[{"id": 1, "text": "A dog."}]', "instances.json", "--captions: missing field 'image_id'"),
    ('[{"image_id": 1, "caption": "A dog."}]', "missing.json", r"--annotations: .*No such file"),
    ('[{"image_id": 1, "caption": "A dog."}]', "not_coco.json",
     "--annotations: a COCO annotation file is a JSON object .* holds a list"),
])
def test_score_cli_bad_input_files_are_one_line_and_exit_2(files, capsys, captions, annotations, match):
    path = files / "in.json"
    if captions is not None:
        path.write_text(captions)
    (files / "not_coco.json").write_text('["a", "list"]')
    assert main(["score", "--captions", str(path), "--annotations", str(files / annotations)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and __import__("re").search(match, err)


# ---- the chair CLI: image order and arguments -------------------------------------------------------------------
def test_select_images_seed_shuffle(tmp_path):
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (7, 3, 9, 1, 5, 2, 8)]
    expected = sorted(images, key=lambda im: im["file_name"])
    random.Random(927).shuffle(expected)
    assert select_images(images, limit=4) == expected[:4]
    assert select_images(images, limit=None, seed=927) == expected
    assert select_images(images, limit=4, seed=1) != expected[:4]
    # the official call, random.seed(927); random.shuffle(files), is the same permutation
    state = random.getstate()
    try:
        official = sorted(images, key=lambda im: im["file_name"])
        random.seed(927)
        random.shuffle(official)
    finally:
        random.setstate(state)
    assert official == expected
    # input order does not matter with order="sorted"; it does with order="annotation"
    assert select_images(images[::-1], limit=None) == expected
    by_annotation = list(images)
    random.Random(927).shuffle(by_annotation)
    assert select_images(images, limit=None, order="annotation") == by_annotation
    # only images present in the folder are kept (before the shuffle)
    for image in images[:5]:
        (tmp_path / image["file_name"]).touch()
    (tmp_path / "stray.jpg").touch()
    present = sorted(images[:5], key=lambda im: im["file_name"])
    random.Random(927).shuffle(present)
    assert select_images(images, limit=3, image_dir=str(tmp_path)) == present[:3]
    # order="listdir": the official shuffle of the folder listing, files without annotation skipped
    listing = os.listdir(tmp_path)
    random.Random(927).shuffle(listing)
    by_name = {im["file_name"]: im for im in images}
    assert select_images(images, None, image_dir=str(tmp_path), order="listdir") == [
        by_name[n] for n in listing if n in by_name]
    assert set(ORDERS) == {"sorted", "listdir", "annotation"}
    with pytest.raises(ValueError):
        select_images(images, order="listdir")


def test_chair_arguments():
    args = parser().parse_args(["chair", "--model", "m", "--method", "paint", "--images", "d", "--annotations",
                                "a.json", "--option", "alpha=0.7", "--option", "preset=paper", "--option",
                                "layers=[2, 32]", "--option", "cfg_gamma=null"])
    assert args.command == "chair" and args.method == "paint" and args.annotations == ["a.json"]
    assert dict(args.option) == {"alpha": 0.7, "preset": "paper", "layers": [2, 32], "cfg_gamma": None}
    assert (args.seed, args.limit, args.max_new_tokens, args.order) == (927, 500, 512, "sorted")
    assert args.prompt == "Please help me describe the image in detail."
    assert args.captions_annotations is None and args.out == "chair_results.json"
    assert parse_option("key=a=b") == ("key", "a=b")
    for bad in (["--option", "alpha"], []):  # a malformed option; a missing --method
        with pytest.raises(SystemExit):
            parser().parse_args(["chair", "--model", "m", "--images", "d", "--annotations", "a.json", *bad])


# ---- the chair CLI end to end, on a tiny LLaVA with an offline processor ---------------------------------------
def tiny_llava_folder(folder: Path) -> Path:
    """A tiny LLaVA-1.5 (``nograd.tiny.vlms``) and a LlavaProcessor built offline, saved with save_pretrained."""
    import tiny
    import transformers as tf
    from tiny import vlm
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
    vocab.update({f"w{i}": i for i in range(4, vlm.TEXT["vocab_size"]) if i != vlm.IMAGE})
    vocab["<image>"] = vlm.IMAGE
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                           pad_token="[PAD]", unk_token="[UNK]",
                                           extra_special_tokens={"image_token": "<image>"})
    image_processor = tf.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    processor = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=7,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=template)
    tiny.build("llava").save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_chair_cli_end_to_end(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    model_dir = tiny_llava_folder(tmp_path / "model")
    images = tmp_path / "val2014"
    images.mkdir()
    rng = np.random.RandomState(0)
    for i in GT:
        Image.fromarray(rng.randint(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(
            images / f"COCO_val2014_{i:012d}.jpg")
    (tmp_path / "instances.json").write_text(json.dumps(instances()))
    out = tmp_path / "out" / "chair.json"
    assert main(["chair", "--model", str(model_dir), "--method", "pai", "--option", "alpha=0.5",
                 "--images", str(images), "--annotations", str(tmp_path / "instances.json"), "--limit", "3",
                 "--max-new-tokens", "5", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["metric", "plain", "pai", "delta"]
    data = json.loads(out.read_text())
    expected = select_images(instances()["images"], 3, 927, str(images))
    assert [im["image_id"] for im in data["images"]] == [im["id"] for im in expected]
    assert data["protocol"]["options"] == {"alpha": 0.5} and data["protocol"]["seed"] == 927
    truth = GroundTruth.from_coco(instances())
    for run in ("plain", "method"):
        captions = data["runs"][run]["captions"]
        assert [c["image_id"] for c in captions] == [im["id"] for im in expected]
        assert all(1 <= len(c["caption"].split()) <= 5 for c in captions)
        rescored = score([(c["image_id"], c["caption"]) for c in captions], truth).metrics()
        assert data["runs"][run]["metrics"] == pytest.approx(rescored)


def test_a_one_record_jsonl_file_is_one_caption(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"image_id": 1, "caption": "A dog and a cat."}) + "\n")
    assert load_captions(str(path)) == {"one": [(1, "A dog and a cat.")]}


@pytest.mark.parametrize("method, option, match", [("zerotunning", [], "did you mean 'zerotuning'"),
                                                   ("pai", ["--option", "alpah=0.5"], "unknown option 'alpah'"),
                                                   ("carve", [], "'carve' does not caption through model.generate"),
                                                   ("softpag", [], "methods that do: act, clearsight, fastv")])
def test_chair_checks_the_method_before_loading_anything(tmp_path, capsys, method, option, match):
    assert main(["chair", "--model", str(tmp_path / "missing"), "--method", method, *option, "--images",
                 str(tmp_path), "--annotations", str(tmp_path / "instances.json")]) == 2
    assert match in capsys.readouterr().err


def test_chair_checks_its_inputs_before_loading_the_model(tmp_path, capsys):
    common = ["chair", "--model", str(tmp_path / "missing"), "--method", "pai"]
    assert main([*common, "--images", str(tmp_path / "nowhere"), "--annotations", str(tmp_path / "a.json")]) == 2
    assert "--images" in capsys.readouterr().err
    assert main([*common, "--images", str(tmp_path), "--annotations", str(tmp_path / "a.json")]) == 2
    assert capsys.readouterr().err.startswith("error: --annotations: ")
    (tmp_path / "a.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [],
                                                 "categories": []}))
    assert main([*common, "--images", str(tmp_path), "--annotations", str(tmp_path / "a.json")]) == 2
    assert "no image of --annotations found" in capsys.readouterr().err
