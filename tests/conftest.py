"""Shared fixtures: tiny random GPT-2 models and a tiny tokenizer, built locally, never downloaded."""

import os

# Triton must see this before it is first imported anywhere: CPU runs kernels in its interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

SAMPLE_CODE = '''
import os
import sys


def add(a, b):
    """Return the sum of a and b."""
    return a + b


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()


for i in range(10):
    print(add(i, i * 2))
'''


@pytest.fixture(scope="session", autouse=True)
def native_step_built():
    """The native step (earlyexit.runtime.native) built, or found built, before any test: a first build takes ~40 s
    and ~1 GB in a compiler, which no test's time or memory bound should count."""
    from earlyexit.runtime import native

    native.extension()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from earlyexit.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer([SAMPLE_CODE] * 20, vocab_size=300, out_dir=out)


def make_tiny_hf(vocab_size: int, seed: int = 0, n_layer: int = 3, n_embd: int = 48, n_head: int = 4, n_positions: int = 96, eos: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
        bos_token_id=eos, eos_token_id=eos,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def tiny_hf(tiny_tokenizer):
    return make_tiny_hf(len(tiny_tokenizer))


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_hf, tiny_tokenizer):
    """A saved tiny checkpoint with its tokenizer, as `--model DIR` would receive it."""
    tiny_hf.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    return tmp_path
