"""Evaluation harness: CHAIR object hallucination with the degeneracy metrics next to it.

    python -m nograd.eval chair --model PATH --method paint --images val2014/ --annotations instances_val2014.json
    python -m nograd.eval score --captions captions.json --annotations instances_val2014.json

``nograd.eval.chair`` is the scorer (importable without a model); ``nograd.eval.__main__`` the command line.
"""

from .chair import (CATEGORIES, SYNONYMS, CaptionScore, ChairResult, GroundTruth, UnknownImagesError,
                    caption_objects, is_repetitive, score, singularize, tokenize, words)

__all__ = ["CATEGORIES", "SYNONYMS", "CaptionScore", "ChairResult", "GroundTruth", "UnknownImagesError",
           "caption_objects", "is_repetitive", "score", "singularize", "tokenize", "words"]
