"""visikv: an exact inference engine and toolkit for KV-cache compression"""

from collections.abc import Sequence

import numpy
from numpy.typing import NDArray

from visikv import (
    _apply_chat_template as apply_chat_template,
    _perplexity as perplexity
)


class Error(RuntimeError):
    pass

def set_threads(threads: int) -> None:
    """Worker threads of every later computation (default: all cores)."""

def threads() -> int:
    """Worker threads computations use."""

def run_command(args: Sequence[str]) -> object:
    """
    Runs a visikv command line in-process (visikv.run wraps it); returns its JSON or None.
    """

def kernels() -> str:
    """The instruction set the weight kernels were chosen for on this CPU."""

class Token:
    """One generated token."""

    @property
    def id(self) -> int:
        """The token id."""

    @property
    def bytes(self) -> bytes:
        """Its bytes (b'' for special tokens)."""

    @property
    def text(self) -> str:
        """
        The text it completes: its bytes, with those of an unfinished character before it, less an unfinished character at its end.
        """

    def __repr__(self) -> str: ...

class Generation:
    """A continuation in progress: iterate it for the new tokens."""

    def __iter__(self) -> Generation: ...

    def __next__(self) -> Token: ...

    @property
    def tokens(self) -> list[int]:
        """The new token ids so far."""

    @property
    def stopped_at_eos(self) -> bool:
        """Whether an end-of-sequence token ended it."""

    @property
    def prefill_seconds(self) -> float:
        """Time spent on the prompt."""

    @property
    def decode_seconds(self) -> float:
        """Time spent on the decode steps after the first token."""

class Model:
    """A loaded checkpoint: config, weights and tokenizer."""

    @staticmethod
    def load(path: str = 'default') -> Model:
        """Opens a Hugging Face model directory, a .gguf file, or 'default'."""

    @property
    def source(self) -> str:
        """The path it came from."""

    @property
    def format(self) -> str:
        """'gguf' or 'safetensors'."""

    @property
    def config(self) -> dict:
        """The model's shapes and special tokens."""

    def describe(self) -> str:
        """The summary `visikv info` prints."""

    def __repr__(self) -> str: ...

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """
        Token ids of `text`; add_special adds BOS (or the template's tokens) as the model's tokenizer does.
        """

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of token ids."""

    def logits(self, tokens: Sequence[int], *, keys: str = 'f32', values: str = 'f32', selector: str = 'dense', numerics: str = 'exact', basis: str | None = None) -> NDArray[numpy.float32]:
        """
        Next-token logits after every prefix of `tokens` (one forward pass from an empty cache), float32 [tokens, vocab].
        """

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True, keys: str = 'f32', values: str = 'f32', selector: str = 'dense', numerics: str = 'exact', basis: str | None = None) -> Generation:
        """
        Continues a prompt (text or token ids): an iterator of Token, computed as it is consumed. Greedy at temperature 0.
        """

    def trace(self, tokens: Sequence[int], *, layers: Sequence[int] | None = None, keys: str = 'f32', values: str = 'f32', selector: str = 'dense', basis: str | None = None) -> dict:
        """
        One forward pass, recorded: {'tokens', 'logits' [T, vocab], 'layers': [{'layer', 'q' [T, heads, head_dim], 'k' and 'v' [T, kv_heads, head_dim], 'attention' [heads, T, T]}]}.
        """
