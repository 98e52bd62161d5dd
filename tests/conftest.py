"""Shared fixtures: tiny models of every family (from configs, seeded, offline) and batches to feed them."""

from __future__ import annotations

import os
import sys

import torch  # (importing torch does not import triton; diffusers does)

if not torch.cuda.is_available():
    # Triton kernels run on CPU only in the interpreter, which must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

import tiny  # noqa: E402
from tiny import text as tiny_text  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def build():
    """``build(family, **overrides)``: a fresh tiny model of ``family``."""
    return tiny.build


@pytest.fixture
def padded_batch():
    """``(input_ids, attention_mask)``: two prompts, the second left-padded by 3 pad tokens."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 128, (2, 10), generator=generator)
    ids[:, 0] = 1  # BOS
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    ids[1, 3] = 1
    return ids, mask


@pytest.fixture(scope="session")
def saved_llama(tmp_path_factory):
    """A tiny Llama saved with ``save_pretrained`` (weights + config) to a temporary folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny.build("llama").save_pretrained(folder)
    tiny_text.tokenizer().save_pretrained(folder)
    return folder
