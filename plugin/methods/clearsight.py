"""ClearSight / visual amplification fusion (Yin et al., CVPR 2025, arXiv 2503.13107; code ``ustc-hyin/ClearSight``).

In the middle decoder layers (official: 9..14 of LLaVA-1.5's 32, ``8 < i < 15`` in ``visaug/inference/
AttnAdapter.py``), for the text rows after the image: the raw logits of image keys are multiplied by ``enhance``
(1.15) and those of the system-prompt keys (every real token before the image; the official code hard-codes
``SYS_LEN = 35``) by ``suppress`` (0.95). Plain multiplication, not sign-aware (spec ``paint.md`` §4): in the
shared edit ``s + m s`` it is ``m = enhance - 1`` and ``m = suppress - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig, is_number, option
from ..registry import register
from .visual_edit import ROWS, VisualEditMethod, check_layers


@dataclass(frozen=True)
class ClearSightConfig(MethodConfig):
    enhance: float = option(1.15, "factor on image-key logits (official 1.15); 1 = unchanged")
    suppress: float = option(0.95, "factor on system-prompt-key logits (official 0.95); 1 = unchanged")
    layers: object = option(None, "decoder layers (start, end); None = the official 9..14 of 32 scaled to the depth")
    rows: str = option("after_image", "edited query rows: 'after_image' (the official text rows) or 'prompt_end'",
                       choices=ROWS)

    def validate(self) -> None:
        for name in ("enhance", "suppress"):
            value = getattr(self, name)
            if not (is_number(value) and value > 0):
                self.invalid(name, "a finite number > 0")
        check_layers(self)


@register
class ClearSight(VisualEditMethod):
    name = "clearsight"
    summary = "multiply image-key logits up and system-prompt-key logits down in the middle layers"
    paper = "ClearSight: Visual Signal Enhancement for Object Hallucination Mitigation in Multimodal LLMs"
    arxiv = "2503.13107"
    Config = ClearSightConfig
    default_layers = (9 / 32, 15 / 32)

    def is_neutral(self) -> bool:
        return self.config.enhance == 1 and self.config.suppress == 1

    def coefficients(self, prompt):
        mul = prompt.visual.float() * (self.config.enhance - 1) + prompt.system().float() * (self.config.suppress - 1)
        return None, mul
