"""RefAM's text side: the prompt with attention magnets, which text tokens are kept, and global attention sinks.

Spec ``refam.md`` §1.4 (magnets: separate ``</s>``-terminated segments after the expression), §1.6 (stop words,
magnets and special tokens are filtered *after* the softmax), §1.7 (GAS: a documented detection rule) and §1.9 (the
noun-phrase heuristic and the spatial-bias cues). Pure functions over token lists and (N, |V|) maps; no model here.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

# NLTK's English stop list (``nltk.corpus.stopwords.words("english")``, 179 words), embedded so nothing downloads.
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom this
that that'll these those am is are was were be been being have has had having do does did doing a an the and but
if or because as until while of at by for with about against between into through during before after above below
to from up down in out on off over under again further then once here there when where why how all any both each
few more most other some such no nor not only own same so than too very s t can will just don don't should
should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't
haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't
weren weren't won won't wouldn wouldn't
""".split())

MAGNETS = (".", "with", "a", "the", "pink")
"""The magnets of the authors' GAS teaser figure (project page ``teaser.webp``): stop words and one colour word."""

ROLES = ("content", "stop", "magnet", "special")

SPATIAL_CUES = {
    "left": "left", "leftmost": "left", "right": "right", "rightmost": "right",
    "top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom",
    "middle": "middle", "center": "middle", "centre": "middle",
}
"""Words that switch on a coordinate ramp of the spatial bias (spec §1.9 [D]); they are never stop words."""

_NP_BREAKS = frozenset("""on in at with of to from by near behind under over above below beside next between
that which who whose where while holding wearing""".split())

_ING_NOUNS = frozenset("""ceiling painting building clothing railing awning earring drawing wedding morning evening
pudding sibling string spring topping frosting stuffing filling bedding siding lighting lightning stocking dumpling
duckling sapling herring viking offspring dining parking living shopping""".split())
"""Words in "-ing" with a stem of 3+ letters that are nouns (or noun modifiers: "dining table", "parking meter") in
referring expressions; shorter ones ("king", "ring", "wing", "icing") are left out by the stem rule."""

_SHORT_ING_VERBS = frozenset("lying dying tying going".split())
""""-ing" verbs whose stem has fewer than 3 letters (the stem rule of ``_is_ing_verb`` would miss them)."""


def normalise_word(word: str) -> str:
    """Lower-case, with leading and trailing punctuation stripped ("Car," -> "car")."""
    return word.lower().strip(string.punctuation + "“”‘’")


@dataclass(frozen=True)
class TextToken:
    """One valid text token (a member of V): its position in V, its piece, the word it belongs to and its role."""

    index: int
    piece: str
    word: str
    word_index: int
    """Index of the word in the expression (-1 for magnets and special tokens)."""
    role: str
    """"content" (kept), "stop" (a stop word or punctuation), "magnet" or "special" (``</s>``, ``<unk>``, bare ``▁``)."""

    @property
    def kept(self) -> bool:
        return self.role == "content"


def classify(pieces: list[str], offsets: list[tuple[int, int]], special: list[bool], text: str, magnet: bool,
             start: int = 0, first_word: int = 0) -> list[TextToken]:
    """Tokens of one segment: ``offsets`` are the fast tokenizer's character spans in ``text``; a token belongs to the
    whitespace word its span overlaps. ``magnet``: the whole segment is a magnet."""
    words, bounds, position = [], [], 0
    for word in text.split():
        begin = text.index(word, position)
        position = begin + len(word)
        words.append(word)
        bounds.append((begin, position))
    tokens = []
    for i, (piece, (a, b), is_special) in enumerate(zip(pieces, offsets, special)):
        hit = next((w for w, (lo, hi) in enumerate(bounds) if a < hi and b > lo and b > a), None)
        bare = piece.replace("▁", "").replace("Ġ", "").replace("</w>", "").strip() == ""
        if is_special or hit is None or bare:
            tokens.append(TextToken(start + i, piece, "", -1, "special"))
            continue
        word = normalise_word(words[hit])
        role = "magnet" if magnet else ("stop" if word in STOP_WORDS or word == "" else "content")
        tokens.append(TextToken(start + i, piece, word or words[hit], -1 if magnet else first_word + hit, role))
    return tokens


def _is_ing_verb(word: str) -> bool:
    """An "-ing" verb of spec §1.9's NP heuristic ("man *standing* near the car"): a stem of at least 3 letters
    ("king", "ring", "thing" are not) and not a common "-ing" noun ("ceiling", "painting")."""
    if word in _SHORT_ING_VERBS:
        return True
    return word.endswith("ing") and len(word) >= 6 and word not in _ING_NOUNS


def noun_phrase(tokens: list[TextToken]) -> set[int]:
    """Word indices of the head noun phrase (spec §1.9, offline heuristic): the content words before the first
    preposition, relative pronoun or "-ing" verb (``_is_ing_verb``) after a content word of the expression (all
    content words if that leaves none)."""
    words: dict[int, str] = {}
    for token in tokens:
        if token.word_index >= 0:
            words.setdefault(token.word_index, token.word)
    phrase = set()
    for index in sorted(words):
        word = words[index]
        if phrase and (word in _NP_BREAKS or _is_ing_verb(word)):
            break
        if word not in STOP_WORDS:
            phrase.add(index)
    return phrase or set(words)


def kept_mask(tokens: list[TextToken], noun_phrase_only: bool = False) -> torch.Tensor:
    """(|V|,) bool: the tokens whose maps are summed (content words; with ``noun_phrase_only`` only the head NP)."""
    phrase = noun_phrase(tokens) if noun_phrase_only else None
    return torch.tensor([t.kept and (phrase is None or t.word_index in phrase) for t in tokens], dtype=torch.bool)


def spatial_cues(text: str) -> list[str]:
    """The spatial-bias cues of an expression, in order ("the cup on the left" -> ["left"])."""
    return [SPATIAL_CUES[w] for w in map(normalise_word, text.split()) if w in SPATIAL_CUES]


def detect_sinks(image_probs: torch.Tensor, text_probs: torch.Tensor, gamma: float = 3.0,
                 kappa: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Global attention sinks of one block (spec §1.7; the rule is ours, none is published).

    ``image_probs`` (B, N, |V|) and ``text_probs`` (B, |V|, |V|): head-averaged, text-restricted probabilities of the
    image queries and of the valid text queries. Token t is a sink iff its received mass
    ``r(t) = mean over all N + |V| queries of p(q, t)`` is at least ``gamma * median_t' r(t')`` and its map is nearly
    uniform over the image: ``std_i p(i, t) / mean_i p(i, t) <= kappa``. Returns (sinks (B, |V|) bool, r (B, |V|)).
    """
    received = torch.cat([image_probs, text_probs], dim=1).mean(dim=1)
    mean = image_probs.mean(dim=1)
    variation = image_probs.std(dim=1, unbiased=False) / mean.clamp_min(1e-30)
    median = received.median(dim=-1, keepdim=True).values
    return (received >= gamma * median) & (variation <= kappa), received
