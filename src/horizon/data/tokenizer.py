"""Loading a model's tokenizer: its `tokenizer.json` (Hugging Face tokenizers) for text, its
end-of-text id, and, when the model has a chat template (`chat_template` in `tokenizer_config.json`,
a `chat_template.jinja` beside it, or `--chat-template`), transformers' own tokenizer from the same
directory to render chats exactly as `apply_chat_template` does."""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from importlib import resources
from pathlib import Path

from ..errors import HorizonError

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")

# Files beside tokenizer.json that change how a chat renders (their bytes key the token cache).
_TEMPLATE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json")
_TEMPLATE_DIR = "additional_chat_templates"
# Bump when the way documents become tokens changes (the token cache is keyed by it).
RENDER_VERSION = 3


def shipped_tokenizer_path() -> Path:
    return Path(str(resources.files("horizon.assets").joinpath("tokenizer.json")))


def shipped_corpus_path() -> Path:
    return Path(str(resources.files("horizon.assets").joinpath("corpus.txt")))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_chat_template_file(path) -> str:
    """The text of a `--chat-template` file (a Jinja template, or a tokenizer_config.json /
    chat_template.json holding one)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HorizonError(f"--chat-template file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HorizonError(f"--chat-template file {str(path)!r} is unreadable ({e})") from None
    if p.suffix.lower() == ".json":
        try:
            t = json.loads(text).get("chat_template")
        except (ValueError, AttributeError):
            t = None
        if not isinstance(t, str) or not t:
            raise HorizonError(f"--chat-template file {str(path)!r} is JSON without a 'chat_template' string")
        return t
    if not text.strip():
        raise HorizonError(f"--chat-template file {str(path)!r} is empty")
    return text


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus what training needs: vocabulary size, end-of-text id, a digest
    of the file (the token cache is keyed by it) and, when there is one, the chat template with the
    transformers tokenizer that renders it (`hf`, loaded on first use)."""

    def __init__(self, path, eos_id: int | None = None, chat_template: str | None = None):
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
        self.digest = _sha(raw)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        if self.vocab_size == 0:
            raise HorizonError(f"tokenizer {str(path)!r} has an empty vocabulary")
        self.eos_id = eos_id if eos_id is not None else self._find_eos()
        self.directory = self.path.parent
        # `chat_template`: the text of a template that replaces the model's (see read_chat_template_file).
        self.template_override = chat_template
        self.is_shipped = self.digest == _shipped_digest()

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

    # ------------------------------------------------------------------ text
    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @cached_property
    def text_prefix(self) -> list[int]:
        """The tokens the tokenizer's post-processor puts before a text (a BOS for Llama-style
        tokenizers; nothing for the shipped one): a text document starts with them."""
        probe = "a"
        with_sp = self.tok.encode(probe, add_special_tokens=True).ids
        bare = self.tok.encode(probe, add_special_tokens=False).ids
        for i in range(len(with_sp) - len(bare) + 1):
            if with_sp[i:i + len(bare)] == bare:
                return with_sp[:i]
        return []

    @property
    def pad_id(self) -> int:
        """The id padding uses (its labels are -100, so only its validity matters)."""
        if self.has_chat_template:
            p = getattr(self.hf, "pad_token_id", None)
            if isinstance(p, int) and 0 <= p < self.vocab_size:
                return p
        return self.eos_id

    # ------------------------------------------------------------------ chat template
    def _config(self) -> dict:
        """tokenizer_config.json beside tokenizer.json ({} when there is none)."""
        cfg = self.directory / "tokenizer_config.json"
        if self.path.name != "tokenizer.json" or not cfg.is_file():
            return {}
        try:
            d = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            d = None
        if not isinstance(d, dict):
            raise HorizonError(f"{cfg} is not a readable JSON object")
        return d

    def _template_beside(self):
        """The model's chat template as transformers finds it: chat_template.jinja first, else
        tokenizer_config.json's (a string, or a list of named templates)."""
        if self.path.name != "tokenizer.json":
            return None
        f = self.directory / "chat_template.jinja"
        if f.is_file():
            return f.read_text(encoding="utf-8")
        t = self._config().get("chat_template")
        if isinstance(t, list):
            return {x["name"]: x["template"] for x in t if isinstance(x, dict) and "name" in x and "template" in x}
        return t or None

    @cached_property
    def has_chat_template(self) -> bool:
        if self.template_override is not None:
            return True
        if self.path.name == "tokenizer.json" and (self.directory / _TEMPLATE_DIR).is_dir():
            return True
        return bool(self._template_beside())

    @cached_property
    def hf(self):
        """transformers' tokenizer for this tokenizer.json's directory (what `AutoTokenizer.
        from_pretrained` gives), with `--chat-template` applied."""
        try:
            from transformers import AutoTokenizer, PreTrainedTokenizerFast
        except ImportError:
            raise HorizonError("chat templates need transformers (pip install 'transformers>=5')") from None
        import logging

        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            t = None
            if self.path.name == "tokenizer.json":
                try:
                    t = AutoTokenizer.from_pretrained(str(self.directory), local_files_only=True)
                except (ValueError, OSError, KeyError):
                    t = None
            if t is None:
                # A lone tokenizer file, or no tokenizer_config.json / config.json saying which
                # class: the plain fast tokenizer with the special tokens and template beside it.
                cfg = self._config()
                special = {k: v for k, v in cfg.items() if k.endswith("_token") and isinstance(v, (str, dict))}
                t = PreTrainedTokenizerFast(tokenizer_file=str(self.path), **special)
                tmpl = self._template_beside()
                if tmpl is not None:
                    t.chat_template = tmpl
        except HorizonError:
            raise
        except Exception as e:
            raise HorizonError(f"transformers cannot load the tokenizer in {str(self.directory)!r}: {e}") from None
        if self.template_override is not None:
            t.chat_template = self.template_override
        return t

    def render_key(self) -> str:
        """A digest of everything that decides how documents become tokens besides the data:
        tokenizer.json, the chat template and the files beside it, and the transformers version
        rendering it."""
        h = hashlib.sha256(f"render-v{RENDER_VERSION}|{self.digest}|eos={self.eos_id}".encode())
        if self.has_chat_template:
            import transformers

            h.update(f"|transformers={transformers.__version__}".encode())
            if self.template_override is not None:
                h.update(b"|override|" + self.template_override.encode())
            for name in _TEMPLATE_FILES:
                f = self.directory / name
                if f.is_file():
                    h.update(f"|{name}|".encode() + f.read_bytes())
            tdir = self.directory / _TEMPLATE_DIR
            if tdir.is_dir():
                for f in sorted(tdir.glob("*.jinja")):
                    h.update(f"|{f.name}|".encode() + f.read_bytes())
        return h.hexdigest()


_SHIPPED_DIGEST: str | None = None


def _shipped_digest() -> str:
    global _SHIPPED_DIGEST
    if _SHIPPED_DIGEST is None:
        try:
            _SHIPPED_DIGEST = _sha(shipped_tokenizer_path().read_bytes())
        except OSError:
            _SHIPPED_DIGEST = ""
    return _SHIPPED_DIGEST


def load_tokenizer(path, eos_id: int | None = None, chat_template_file=None) -> TextTokenizer:
    """A TextTokenizer for `path` (a tokenizer.json, or the directory holding one), with the
    template of `chat_template_file` (`--chat-template`) replacing the model's."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
        if not p.is_file():
            raise HorizonError(f"{str(path)!r} has no tokenizer.json")
    override = read_chat_template_file(chat_template_file) if chat_template_file else None
    return TextTokenizer(p, eos_id=eos_id, chat_template=override)


def eos_from_config(config: dict) -> int | None:
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if isinstance(eos, int) else None
