"""nograd.kernels: the maths of every method, one module per kernel, each with its PyTorch reference.

``attention`` (biased / blended attention with LSE; backends triton, flex, sdpa, eager; ``use_backend`` picks
one for every method's attention in a block), ``attention_rows``, ``key_attention_mass`` and ``attention_block``
(statistics of one attention call), ``attention_rescaled_set`` (ACT's row-wise set calibration), and the helpers that turn masks and reweighting factors into logit biases.
"""

from .attention import (
    BACKENDS,
    ScoreEdit,
    attention,
    choose_backend,
    causal_visibility,
    padding_to_bias,
    reweight_to_bias,
    row_logsumexp,
    scaled_logits,
    soft_identity_blend,
    use_backend,
)
from .set_rescale import attention_rescaled_set
from .stats import attention_block, attention_rows, key_attention_mass

__all__ = [
    "BACKENDS",
    "ScoreEdit",
    "attention",
    "attention_block",
    "attention_rescaled_set",
    "attention_rows",
    "choose_backend",
    "causal_visibility",
    "key_attention_mass",
    "padding_to_bias",
    "reweight_to_bias",
    "row_logsumexp",
    "scaled_logits",
    "soft_identity_blend",
    "use_backend",
]
