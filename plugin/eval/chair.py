"""CHAIR: object hallucination in image captions (Rohrbach et al., EMNLP 2018, arXiv 1809.02156).

A re-implementation, written for this package, of the scorer the hallucination papers use: the original
``LisaAnne/Hallucination`` ``utils/chair.py`` and its Python 3 derivative ``modPAI/chair.py`` in ``hasanar1f/PAINT``
(via OPERA / PAI), which adds recall and F1. No code or data file is taken from them; the synonym table below is
written here as data, following the original's 80 synonym sets.

How a caption is read (the original's pipeline, step for step):

1. lowercase, tokenise (words, possessive/contraction suffixes such as ``'s``, and punctuation are separate tokens;
   hyphenated words stay one token, as in NLTK's Treebank tokeniser);
2. singularise every token (``singularize`` below, a small rule lemmatiser instead of NLTK/WordNet or pattern.en);
3. merge two-word phrases left to right, greedily (``PHRASES``): the multi-word synonyms ("hot dog", "teddy bear",
   "cell phone", "fire hydrant", ...), "baby"/"adult" + animal -> the animal (so "baby elephant" is no person),
   "passenger jet/train" -> jet/train, "bow tie" -> tie, "toilet seat" -> toilet, and the blockers "home plate" and
   "train track" (so "train tracks" mentions no train);
4. if "toilet" and "seat" both occur, drop every "seat" (a toilet's seat is no chair);
5. keep the tokens that are COCO synonyms and map each to its category.

Ground truth per image = the COCO instance categories, plus (optionally, as the original does) every category
mentioned in the image's COCO reference captions, read with the same pipeline.

Metrics (all micro-averaged over the caption set, as ``modPAI/chair.py`` computes them):

- ``chair_s``: share of captions with at least one hallucinated object;
- ``chair_i``: hallucinated object mentions / all object mentions. As in both official scorers, every mention
  counts (a caption saying "a dog ... the dog" has two mentions of dog);
- ``chair_i_unique``: the same with each object counted once per caption (= 1 - precision);
- ``recall``: GT objects mentioned / GT objects (summed over captions);
- ``precision``: GT objects mentioned / distinct objects mentioned (summed over captions), PAINT's precision;
- ``f1``: 2PR / (P + R) of that precision and recall (PAINT's "F1");
- ``mean_length``: mean number of words per caption (word tokens; punctuation and ``'s`` are not words);
- ``repetition_rate``: share of captions in which some sentence occurs ``repeat_threshold`` (3) or more times;
- ``distinct_2``: distinct word bigrams / all word bigrams, pooled over the set (bigrams do not cross captions).

Known deviations from the official scorers (all small; the spec's re-scoring with a rule lemmatiser matched the
official numbers to about +-0.2):

- Lemmatiser. The original uses pattern.en ``singularize``; PAINT's copy uses NLTK POS tags + WordNet's
  lemmatiser. Ours only singularises plural nouns, and only towards a word this scorer knows (a synonym or a part
  of a phrase), so it cannot invent matches. Consequences: (a) PAINT lemmatises words tagged as verbs too, so it
  reads "seated" as seat (-> chair), "skiing" as ski (-> skis), "training" as train, "sinking" as sink, "tied" as
  tie, "bowling" as bowl, "taxiing" as taxi (-> car); we do not (those are no object mentions here); (b) unknown
  irregular plurals that are not in ``IRREGULAR`` stay unmatched.
- Typos in the original synonym file: its double spaces ("scooter,  motor bike", "cake,  cheesecake") leave the
  entries " motor bike" and " cheesecake" unmatchable; here "motor bike" and "cheesecake" are matched (as intended).
  "stove top oven" (three words, never reachable by a two-word merge) is left out; "iPhone" (never matched after
  lowercasing) is left out too.
- Tokeniser: a regex instead of NLTK's Treebank tokeniser. Differences are limited to odd punctuation
  (e.g. "dog/cat" is two words here, one token in NLTK) and contractions ("don't" -> "don" "'t" here, "do" "n't").
- Length is counted in words (see above), not in tokens after phrase merging, and not scaled by 0.01 as in
  PAINT's ``Len``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

# ---- the synonym table ------------------------------------------------------------------------------------------
# COCO category -> words (and two-word phrases) that name it in a caption; the category name itself always counts.
# Follows the original CHAIR's synonym sets (typos such as "televison", "solider", "phon" and "knive" included: they
# catch the same misspellings in captions).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "girl", "boy", "man", "woman", "kid", "child", "chef", "baker", "people", "adult", "rider", "children",
        "baby", "worker", "passenger", "sister", "biker", "policeman", "cop", "officer", "lady", "cowboy", "bride",
        "groom", "male", "female", "guy", "traveler", "mother", "father", "gentleman", "pitcher", "player", "skier",
        "snowboarder", "skater", "skateboarder", "foreigner", "caller", "offender", "coworker", "trespasser",
        "patient", "politician", "soldier", "grandchild", "serviceman", "walker", "drinker", "doctor", "bicyclist",
        "thief", "buyer", "teenager", "student", "camper", "driver", "solider", "hunter", "shopper", "villager",
    ),
    "bicycle": ("bike", "unicycle", "minibike", "trike"),
    "car": ("automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab", "jeep", "coupe", "taxicab", "limo",
            "taxi"),
    "motorcycle": ("scooter", "motor bike", "motor cycle", "motorbike", "moped"),
    "airplane": ("jetliner", "plane", "air plane", "monoplane", "aircraft", "jet", "airbus", "biplane", "seaplane"),
    "bus": ("minibus", "trolley"),
    "train": ("locomotive", "tramway", "caboose"),
    "truck": ("pickup", "lorry", "hauler", "firetruck"),
    "boat": (
        "ship", "liner", "sailboat", "motorboat", "dinghy", "powerboat", "speedboat", "canoe", "skiff", "yacht",
        "kayak", "catamaran", "pontoon", "houseboat", "vessel", "rowboat", "trawler", "ferryboat", "watercraft",
        "tugboat", "schooner", "barge", "ferry", "sailboard", "paddleboat", "lifeboat", "freighter", "steamboat",
        "riverboat", "battleship", "steamship",
    ),
    "traffic light": ("street light", "traffic signal", "stop light", "streetlight", "stoplight"),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": (),
    "bench": ("pew",),
    "bird": (
        "ostrich", "owl", "seagull", "goose", "duck", "parakeet", "falcon", "robin", "pelican", "waterfowl", "heron",
        "hummingbird", "mallard", "finch", "pigeon", "sparrow", "seabird", "osprey", "blackbird", "fowl",
        "shorebird", "woodpecker", "egret", "chickadee", "quail", "bluebird", "kingfisher", "buzzard", "willet",
        "gull", "swan", "bluejay", "flamingo", "cormorant", "parrot", "loon", "gosling", "waterbird", "pheasant",
        "rooster", "sandpiper", "crow", "raven", "turkey", "oriole", "cowbird", "warbler", "magpie", "peacock",
        "cockatiel", "lorikeet", "puffin", "vulture", "condor", "macaw", "peafowl", "cockatoo", "songbird",
    ),
    "cat": ("kitten", "feline", "tabby"),
    "dog": (
        "puppy", "beagle", "pup", "chihuahua", "schnauzer", "dachshund", "rottweiler", "canine", "pitbull", "collie",
        "pug", "terrier", "poodle", "labrador", "doggie", "doberman", "mutt", "doggy", "spaniel", "bulldog",
        "sheepdog", "weimaraner", "corgi", "cocker", "greyhound", "retriever", "brindle", "hound", "whippet", "husky",
    ),
    "horse": ("colt", "pony", "racehorse", "stallion", "equine", "mare", "foal", "palomino", "mustang", "clydesdale",
              "bronc", "bronco"),
    "sheep": ("lamb", "ram", "goat", "ewe"),
    "cow": ("cattle", "oxen", "ox", "calf", "holstein", "heifer", "buffalo", "bull", "zebu", "bison"),
    "elephant": (),
    "bear": ("panda",),
    "zebra": (),
    "giraffe": (),
    "backpack": ("knapsack",),
    "umbrella": (),
    "handbag": ("wallet", "purse", "briefcase"),
    "tie": ("bow", "bow tie"),
    "suitcase": ("suit case", "luggage"),
    "frisbee": (),
    "skis": ("ski",),
    "snowboard": (),
    "sports ball": ("ball",),
    "kite": (),
    "baseball bat": (),
    "baseball glove": (),
    "skateboard": (),
    "surfboard": ("longboard", "skimboard", "shortboard", "wakeboard"),
    "tennis racket": ("racket",),
    "bottle": (),
    "wine glass": (),
    "cup": (),
    "fork": (),
    "knife": ("pocketknife", "knive"),
    "spoon": (),
    "bowl": ("container",),
    "banana": (),
    "apple": (),
    "sandwich": ("burger", "sub", "cheeseburger", "hamburger"),
    "orange": (),
    "broccoli": (),
    "carrot": (),
    "hot dog": (),
    "pizza": (),
    "donut": ("doughnut", "bagel"),
    "cake": ("cheesecake", "cupcake", "shortcake", "coffeecake", "pancake"),
    "chair": ("seat", "stool"),
    "couch": ("sofa", "recliner", "futon", "loveseat", "settee", "chesterfield"),
    "potted plant": ("houseplant",),
    "bed": (),
    "dining table": ("table", "desk"),
    "toilet": ("urinal", "commode", "lavatory", "potty"),
    "tv": ("monitor", "televison", "television"),
    "laptop": ("computer", "notebook", "netbook", "lenovo", "macbook", "laptop computer"),
    "mouse": (),
    "remote": (),
    "keyboard": (),
    "cell phone": ("mobile phone", "phone", "cellphone", "telephone", "phon", "smartphone"),
    "microwave": (),
    "oven": ("stovetop", "stove"),
    "toaster": (),
    "sink": (),
    "refrigerator": ("fridge", "freezer"),
    "book": (),
    "clock": (),
    "vase": (),
    "scissors": (),
    "teddy bear": ("teddybear",),
    "hair drier": ("hairdryer",),
    "toothbrush": (),
}

CATEGORIES: tuple[str, ...] = tuple(SYNONYMS)

# synonym (one token after phrase merging) -> category
WORD_TO_CATEGORY: dict[str, str] = {}
for _category, _words in SYNONYMS.items():
    for _word in (_category, *_words):
        if WORD_TO_CATEGORY.setdefault(_word, _category) != _category:  # pragma: no cover - table sanity
            raise AssertionError(f"synonym {_word!r} is listed under two categories")

# ---- two-word phrases -------------------------------------------------------------------------------------------
# "w1 w2" (after singularising) -> the token it becomes. Multi-word synonyms map to themselves; the original's
# special cases map a qualifier + noun to the noun.
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
PHRASES: dict[str, str] = {
    **{word: word for word in WORD_TO_CATEGORY if " " in word},
    "home plate": "home plate",  # baseball: blocks nothing in COCO, kept from the original
    "train track": "train track",  # "train tracks" is no train (PAINT's list)
    **{f"baby {animal}": animal for animal in _ANIMALS},  # "baby elephant" is no person
    **{f"adult {animal}": animal for animal in _ANIMALS},
    "passenger jet": "jet",  # "passenger jet" is no person
    "passenger train": "train",
    "bow tie": "tie",
    "toilet seat": "toilet",  # a toilet seat is no chair
}

# ---- the rule lemmatiser ----------------------------------------------------------------------------------------
# Every word this scorer can act on: a plural is only ever reduced to one of these.
VOCABULARY: frozenset[str] = frozenset(w for phrase in (*WORD_TO_CATEGORY, *PHRASES) for w in phrase.split())

IRREGULAR: dict[str, str] = {
    "grandchildren": "grandchild", "knives": "knife", "mice": "mouse", "geese": "goose", "busses": "bus",
}

_SUFFIX_RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    # (suffix, replacements, what the stem must end with: "" = anything)
    ("men", ("man",), ("",)),  # women, policemen, gentlemen, servicemen
    ("s", ("",), ("",)),  # dogs, horses, ties, phones (not "phon"), doggies
    ("ies", ("y",), ("",)),  # puppies, babies
    ("ves", ("f", "fe"), ("",)),  # calves, knives
    ("es", ("",), ("s", "x", "z", "ch", "sh")),  # buses, benches, glasses, boxes; not skies, manes, vanes
)


def singularize(word: str) -> str:
    """The singular of ``word`` if it is a plural of a word this scorer knows (``VOCABULARY``), else ``word``.

    A known word is kept as is ("bus", "glass", "skis", "people", "scissors"), then the irregular table, then the
    suffix rules in order; the first candidate that is a known word wins. Verbs are never lemmatised.
    """
    if word in VOCABULARY:
        return word
    if word in IRREGULAR:
        return IRREGULAR[word]
    for suffix, replacements, stem_ends in _SUFFIX_RULES:
        if word.endswith(suffix) and word[: -len(suffix)].endswith(stem_ends):
            stem = word[: -len(suffix)]
            for replacement in replacements:
                if stem + replacement in VOCABULARY:  # (the empty string never is)
                    return stem + replacement
    return word


# ---- text processing --------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"[^\W_]+(?:-[^\W_]+)*|'[^\W_]*|[^\w\s]|_")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def tokenize(text: str) -> list[str]:
    """Lowercase tokens: words (hyphenated words whole), ``'s``-style suffixes, and single punctuation marks."""
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


def words(text: str) -> list[str]:
    """The word tokens of ``text`` (no punctuation, no ``'s``): what length and distinct-2 count."""
    return [t for t in tokenize(text) if t[0].isalnum()]


def sentences(text: str) -> list[str]:
    """Normalised sentences of ``text``: split after ``.!?`` and at line breaks, lowercased, whitespace collapsed,
    end punctuation dropped; empty ones removed."""
    out = []
    for part in _SENTENCE_END.split(text):
        norm = " ".join(part.lower().split()).rstrip(" .!?")
        if norm:
            out.append(norm)
    return out


def is_repetitive(text: str, threshold: int = 3) -> bool:
    """Whether some sentence of ``text`` occurs ``threshold`` or more times."""
    counts = Counter(sentences(text))
    return bool(counts) and max(counts.values()) >= threshold


def caption_objects(text: str) -> list[tuple[str, str]]:
    """Every COCO object mention of ``text``, in order: ``(word, category)`` (``word`` after singularising and
    phrase merging, e.g. ``("puppy", "dog")``, ``("hot dog", "hot dog")``)."""
    tokens = [singularize(t) for t in tokenize(text)]
    merged, i = [], 0
    while i < len(tokens):
        pair = " ".join(tokens[i:i + 2])
        if i + 1 < len(tokens) and pair in PHRASES:
            merged.append(PHRASES[pair])
            i += 2
        else:
            merged.append(tokens[i])
            i += 1
    if "toilet" in merged and "seat" in merged:
        merged = [t for t in merged if t != "seat"]
    return [(t, WORD_TO_CATEGORY[t]) for t in merged if t in WORD_TO_CATEGORY]


# ---- ground truth -----------------------------------------------------------------------------------------------
def normalize_id(image_id: Any) -> Any:
    """COCO image ids are ints; JSON object keys are strings: ``"42"`` -> ``42``, anything else unchanged."""
    if isinstance(image_id, str) and image_id.strip().isdigit():
        return int(image_id)
    return image_id


def _load(source: Any) -> dict:
    """A COCO annotation file (a path, or the loaded dict): a JSON object with ``annotations`` (and, for instances,
    ``images`` and ``categories``)."""
    if isinstance(source, (str, Path)):
        with open(source, encoding="utf-8") as f:
            data = json.load(f)
    else:
        data = source
    if not isinstance(data, dict):
        raise ValueError(f"a COCO annotation file is a JSON object with 'annotations' (and 'images', 'categories'); "
                         f"{source if isinstance(source, (str, Path)) else 'this input'} holds a "
                         f"{type(data).__name__}")
    return data


def _sources(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class GroundTruth:
    """image id -> set of COCO categories, and the images' file names (``{id: file_name}``)."""

    objects: dict[Any, set[str]]
    file_names: dict[Any, str] = field(default_factory=dict)

    @classmethod
    def from_coco(cls, instances: Any, captions: Any = None) -> "GroundTruth":
        """From instance annotations (``instances_val2014.json`` format: a path or a loaded dict, or a list of them,
        e.g. train + val as PAINT does) and optionally COCO caption annotations (``captions_val2014.json``), whose
        mentioned objects count as ground truth too (the original CHAIR's rule)."""
        objects: dict[Any, set[str]] = {}
        file_names: dict[Any, str] = {}
        for source in _sources(instances):
            data = _load(source)
            names = {c["id"]: c["name"] for c in data.get("categories", [])}
            unknown = sorted(set(names.values()) - set(CATEGORIES))
            if unknown:
                raise ValueError(f"categories not in the COCO synonym table: {', '.join(unknown)}")
            for image in data.get("images", []):
                image_id = normalize_id(image["id"])
                objects.setdefault(image_id, set())
                if "file_name" in image:
                    file_names[image_id] = image["file_name"]
            for ann in data.get("annotations", []):
                if ann["category_id"] not in names:
                    raise ValueError(f"annotation for image {ann['image_id']} has unknown category id "
                                     f"{ann['category_id']}")
                objects.setdefault(normalize_id(ann["image_id"]), set()).add(names[ann["category_id"]])
        for source in _sources(captions):
            for ann in _load(source).get("annotations", []):
                image_id = normalize_id(ann["image_id"])
                objects.setdefault(image_id, set()).update(c for _, c in caption_objects(ann["caption"]))
        return cls(objects, file_names)


# ---- scoring ----------------------------------------------------------------------------------------------------
@dataclass
class CaptionScore:
    """One caption's details."""

    image_id: Any
    caption: str
    length: int  # words
    mentions: list[tuple[str, str]]  # (word, category), every mention in order
    objects: list[str]  # distinct categories mentioned, in order of first mention
    hallucinated: list[str]  # distinct mentioned categories not in the ground truth
    hallucinated_mentions: int  # mentions of those
    gt_objects: list[str]  # sorted
    recalled: list[str]  # ground-truth categories mentioned, sorted
    repetitive: bool

    @property
    def chair_s(self) -> bool:
        return bool(self.hallucinated)


@dataclass
class ChairResult:
    """Set-level metrics (fractions in [0, 1], length in words) and per-caption details."""

    n_captions: int
    chair_s: float
    chair_i: float
    chair_i_unique: float
    recall: float
    precision: float
    f1: float
    mean_length: float
    repetition_rate: float
    distinct_2: float
    n_mentions: int
    n_hallucinated_mentions: int
    n_objects: int  # distinct objects per caption, summed
    n_hallucinated_objects: int
    n_gt_objects: int
    n_recalled: int
    captions: list[CaptionScore] = field(default_factory=list, repr=False)

    METRICS = ("chair_s", "chair_i", "chair_i_unique", "recall", "precision", "f1", "mean_length",
               "repetition_rate", "distinct_2")

    def metrics(self) -> dict[str, float]:
        """The headline metrics and the counts behind them."""
        data = asdict(self)
        data.pop("captions")
        return data

    def to_dict(self) -> dict:
        return {"metrics": self.metrics(), "per_caption": [
            {**asdict(c), "mentions": [list(m) for m in c.mentions], "chair_s": c.chair_s} for c in self.captions]}


class UnknownImagesError(KeyError):
    """Captions for images the ground truth does not know (see ``score(strict=True)``)."""


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def score(captions: Mapping[Any, str] | Iterable[tuple[Any, str]], ground_truth: GroundTruth | Mapping[Any, set],
          *, repeat_threshold: int = 3, strict: bool = True) -> ChairResult:
    """Score ``captions`` (``{image_id: caption}`` or ``(image_id, caption)`` pairs, duplicates allowed) against
    ``ground_truth`` (a ``GroundTruth`` or ``{image_id: categories}``).

    ``strict``: a caption for an image the ground truth does not know raises ``UnknownImagesError`` (a wrong
    annotation file would otherwise score every object as hallucinated); with ``strict=False`` such an image has no
    objects, as in the official scorers.
    """
    gt = ground_truth.objects if isinstance(ground_truth, GroundTruth) else ground_truth
    gt = {normalize_id(k): set(v) for k, v in gt.items()}
    pairs = list(captions.items()) if isinstance(captions, Mapping) else list(captions)
    if strict:
        unknown = [i for i, _ in pairs if normalize_id(i) not in gt]
        if unknown:
            raise UnknownImagesError(f"{len(unknown)} caption(s) for images not in the annotations, e.g. "
                                     f"{unknown[:5]}; check the annotation file (or pass strict=False)")
    scores: list[CaptionScore] = []
    bigrams: Counter = Counter()
    for image_id, text in pairs:
        image_id, text = normalize_id(image_id), text or ""
        truth = gt.get(image_id, set())
        mentions = caption_objects(text)
        objects = list(dict.fromkeys(c for _, c in mentions))
        hallucinated = [c for c in objects if c not in truth]
        tokens = words(text)
        bigrams.update(zip(tokens, tokens[1:]))
        scores.append(CaptionScore(
            image_id=image_id, caption=text, length=len(tokens), mentions=mentions, objects=objects,
            hallucinated=hallucinated, hallucinated_mentions=sum(c not in truth for _, c in mentions),
            gt_objects=sorted(truth), recalled=sorted(set(objects) & truth),
            repetitive=is_repetitive(text, repeat_threshold)))
    n = len(scores)
    n_mentions = sum(len(s.mentions) for s in scores)
    n_hall_mentions = sum(s.hallucinated_mentions for s in scores)
    n_objects = sum(len(s.objects) for s in scores)
    n_hall_objects = sum(len(s.hallucinated) for s in scores)
    n_gt = sum(len(s.gt_objects) for s in scores)
    n_recalled = sum(len(s.recalled) for s in scores)
    recall, precision = _ratio(n_recalled, n_gt), _ratio(n_recalled, n_objects)
    return ChairResult(
        n_captions=n,
        chair_s=_ratio(sum(s.chair_s for s in scores), n),
        chair_i=_ratio(n_hall_mentions, n_mentions),
        chair_i_unique=_ratio(n_hall_objects, n_objects),
        recall=recall,
        precision=precision,
        f1=_ratio(2 * precision * recall, precision + recall),
        mean_length=_ratio(sum(s.length for s in scores), n),
        repetition_rate=_ratio(sum(s.repetitive for s in scores), n),
        distinct_2=_ratio(len(bigrams), sum(bigrams.values())),
        n_mentions=n_mentions, n_hallucinated_mentions=n_hall_mentions, n_objects=n_objects,
        n_hallucinated_objects=n_hall_objects, n_gt_objects=n_gt, n_recalled=n_recalled, captions=scores)
