"""Small data shared by the tokenizer, corpus and loader tests (each built once per session)."""

from __future__ import annotations

import functools

from nanoseek.data.tasks import task_documents
from nanoseek.tokenizer import Tokenizer

ENGLISH = (
    "The history of mathematics is long. Early people counted with stones and marks on bones; "
    "later, merchants needed sums, differences and products to keep their accounts in order."
)
CHINESE = "数学的历史很长。早期的人们用石头和骨头上的刻痕来计数；后来，商人需要加法、减法和乘法来记账。"


@functools.cache
def small_tokenizer() -> Tokenizer:
    """A 700-token BPE over generated tasks plus some English and Chinese prose."""
    return Tokenizer.train(task_documents(1500, seed=0) + [ENGLISH, CHINESE] * 20, vocab_size=700)
