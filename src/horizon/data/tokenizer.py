"""Loading a model's `tokenizer.json` (Hugging Face tokenizers) and finding its end-of-text id."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from ..errors import HorizonError

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


def shipped_tokenizer_path() -> Path:
    return Path(str(resources.files("horizon.assets").joinpath("tokenizer.json")))


def shipped_corpus_path() -> Path:
    return Path(str(resources.files("horizon.assets").joinpath("corpus.txt")))


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus what training needs: vocabulary size, end-of-text id and a
    digest of the file (the token cache is keyed by it)."""

    def __init__(self, path, eos_id: int | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            raise HorizonError(f"cannot read tokenizer {str(path)!r}: {e.strerror or e}") from None
        try:
            self.tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise HorizonError(f"tokenizer {str(path)!r} is not a valid tokenizer.json ({e})") from None
        self.digest = hashlib.sha256(raw).hexdigest()
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        if self.vocab_size == 0:
            raise HorizonError(f"tokenizer {str(path)!r} has an empty vocabulary")
        self.eos_id = eos_id if eos_id is not None else self._find_eos()

    def _find_eos(self) -> int:
        for name in EOS_CANDIDATES:
            i = self.tok.token_to_id(name)
            if i is not None:
                return i
        # tokenizer_config.json beside it may name the eos token.
        cfg = self.path.with_name("tokenizer_config.json")
        if cfg.is_file():
            try:
                eos = json.loads(cfg.read_text()).get("eos_token")
                if isinstance(eos, dict):
                    eos = eos.get("content")
                if isinstance(eos, str) and self.tok.token_to_id(eos) is not None:
                    return self.tok.token_to_id(eos)
            except (OSError, ValueError):
                pass
        raise HorizonError(
            f"tokenizer {str(self.path)!r} has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)});"
            " set eos_token_id in the model's config.json"
        )

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def eos_from_config(config: dict) -> int | None:
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if isinstance(eos, int) else None
