"""PAI: pay more attention to the image (Liu et al., ECCV 2024, arXiv 2407.21771; official code ``LALBJ/PAI``).

In decoder layers ``[2, L)``, every head, the rows from the prompt's last token on: ``s <- s + alpha * |s|`` on the
logits of every image key (``llama_new_forward`` in the official code; spec ``paint.md`` §4), which raises the
image keys' weight whatever the sign of the score. The official default ``alpha = 0.2`` is the README's
LLaVA-1.5 setting. PAI's second part, the image-free contrastive logits refine, is ``cfg_gamma`` (1.1 in the
paper; off by default, as it costs one image-free forward per step).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig, is_number, option
from ..registry import register
from .visual_edit import CFG_GAMMA_DOC, ROWS, VisualEditMethod, check_cfg_gamma, check_layers


@dataclass(frozen=True)
class PAIConfig(MethodConfig):
    alpha: float = option(0.2, "margin on image keys: s + alpha*|s| (official README, LLaVA-1.5); 0 = unchanged")
    layers: object = option(None, "decoder layers (start, end); None = the official [2, 32) scaled to the depth")
    cfg_gamma: object = option(None, CFG_GAMMA_DOC)
    rows: str = option("prompt_end", "edited query rows: 'prompt_end' (the prompt's last row and every generated "
                                     "row, the official behaviour) or 'after_image' (every row after the image)",
                       choices=ROWS)

    def validate(self) -> None:
        if not is_number(self.alpha):
            self.invalid("alpha", "a finite number")
        check_layers(self)
        check_cfg_gamma(self)


@register
class PAI(VisualEditMethod):
    name = "pai"
    summary = "amplify attention to every image token in the logits (s + alpha*|s|) from the prompt's end on"
    paper = "Paying More Attention to Image: A Training-Free Method for Alleviating Hallucination in LVLMs"
    arxiv = "2407.21771"
    Config = PAIConfig
    default_layers = (2 / 32, 1.0)

    def is_neutral(self) -> bool:
        return self.config.alpha == 0

    def coefficients(self, prompt):
        return prompt.visual.float() * self.config.alpha, None
