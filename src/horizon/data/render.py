"""Documents -> tokens and trained-token masks.

Text: the tokenizer's own prefix (a BOS where its post-processor adds one), the text, and the
end-of-text token, all trained; a string prompt/completion trains the completion and the
end-of-text only.

Chat, with a model chat template: rendered by transformers' `apply_chat_template`, so the tokens
are exactly the ones transformers gives. The trained tokens are the assistant's:
- where the template marks them with `{% generation %}`, transformers' own assistant mask
  (`return_assistant_tokens_mask=True`);
- otherwise by rendering prefixes and diffing: the assistant message `i` spans, in the rendering of
  the whole conversation, from the end of `messages[:i]` rendered with the generation prompt to the
  end of `messages[:i+1]`; a token overlapping that span is trained (transformers' rule for its
  mask). A template that renders an earlier turn differently once later turns follow cannot be
  split this way: such a conversation is refused with a line that says so.
Chat with the shipped tokenizer (no template): our own layout (`sources.chat_segments`).
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import HorizonError
from .sources import ROLES, BadRecord, Document, chat_segments
from .tokenizer import TextTokenizer

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class DocumentEncoder:
    """Turns Documents into `(ids uint32, mask uint8)`; chats through the tokenizer's chat template."""

    def __init__(self, tok: TextTokenizer):
        self.tok = tok
        self.template = tok.has_chat_template
        if self.template:
            self.hf = tok.hf
            if self.hf.chat_template is None:
                raise HorizonError(f"transformers found no chat template in {str(tok.directory)!r}")

    # ------------------------------------------------------------------ text
    def encode_text_pieces(self, pieces: list[tuple[Document, bool]]) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """Encodes text documents (or pieces of one) in one batch: `(ids, mask, content tokens)`
        each. `pieces` holds `(doc, starts)`, `starts` saying the piece begins a document (it then
        gets the tokenizer's prefix); a piece with `doc.ends` gets the end-of-text token."""
        texts = [t for d, _ in pieces for t, _ in d.segments]
        encoded = self.tok.encode_many(texts) if texts else []
        prefix = self.tok.text_prefix
        out, k = [], 0
        for d, starts in pieces:
            ids: list[int] = list(prefix) if starts else []
            mask: list[int] = [1] * len(ids)
            content = 0
            for _, trained in d.segments:
                e = encoded[k]
                k += 1
                ids += e
                mask += [1 if trained else 0] * len(e)
                content += len(e)
            if d.ends:
                # The model learns where a text ends; our chat layout ends with the assistant's
                # end-of-turn, so its separator is context.
                ids.append(self.tok.eos_id)
                mask.append(0 if d.layout_chat else 1)
            out.append((np.asarray(ids, dtype=np.uint32), np.asarray(mask, dtype=np.uint8), content))
        return out

    # ------------------------------------------------------------------ chat
    def chat_document(self, doc: Document, where: str) -> Document:
        """For the layout path: the chat as text segments (raises BadRecord for what the layout
        cannot hold)."""
        if self.tok.is_shipped:
            for i, m in enumerate(doc.messages):
                if m.get("role") not in ROLES:
                    raise BadRecord(
                        f"field {doc.field!r}: message {i} has unknown role {m.get('role')!r} for the shipped"
                        f" tokenizer's layout (use {', '.join(ROLES)}; other roles need a model chat template)"
                    )
                if m.get("tool_calls"):
                    raise BadRecord(
                        f"field {doc.field!r}: message {i} has tool calls, which need a model chat template"
                        " (the shipped tokenizer's layout has plain system, user and assistant turns)"
                    )
                if not isinstance(m.get("content"), str):
                    raise BadRecord(f"field {doc.field!r}: message {i} 'content' must be a string")
            try:
                segs = chat_segments(doc.messages, where, train_from=doc.train_from)
            except HorizonError as e:
                raise BadRecord(str(e).removeprefix(f"{where}: ")) from None
            return Document(segments=segs, ends=True, layout_chat=True)
        raise HorizonError(
            f"{where}: chat data needs a chat template, and tokenizer {str(self.tok.path)!r} has none"
            " (no chat_template in tokenizer_config.json, no chat_template.jinja); pass --chat-template FILE"
        )

    def _render(self, msgs, tools, agp: bool) -> str:
        return self.hf.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=agp)

    def encode_chat(self, doc: Document) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and assistant mask of one conversation through the model's chat template.
        Raises BadRecord (naming the field) when the template fails on it or cannot separate the
        assistant's tokens."""
        msgs, tools, fld = doc.messages, doc.tools, doc.field
        hf = self.hf
        trained_msgs = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and i >= doc.train_from]

        def failed(e: Exception, what: str = "it") -> BadRecord:
            # jinja's TemplateError, the template's raise_exception, type errors in the template
            return BadRecord(f"field {fld!r}: the chat template failed on {what}: {_one_line(e)}")

        def prefix_end(full: str, i: int) -> int:
            """Where, in `full`, the assistant message i starts (after its generation prompt)."""
            try:
                p = self._render(msgs[:i], tools, True)
            except Exception as e:
                raise failed(e, "a prefix of it") from None
            if not full.startswith(p):
                raise BadRecord(
                    f"field {fld!r}: the chat template renders the turns before message {i} differently"
                    " once later turns follow, so the assistant's tokens cannot be separated"
                    " (a template with {% generation %} markers can; see --chat-template)"
                )
            return len(p)

        try:
            template = hf.get_chat_template(None, tools)
        except Exception as e:
            raise failed(e) from None
        if GENERATION_MARKER.search(template):
            try:
                out = hf.apply_chat_template(msgs, tools=tools, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
            except Exception as e:
                raise failed(e) from None
            ids = np.asarray(out["input_ids"], dtype=np.uint32)
            mask = np.asarray(out["assistant_masks"], dtype=np.uint8)
            if doc.train_from > 0 and mask.any():
                # Only the completion's turns are trained: nothing up to its generation prompt.
                try:
                    full = self._render(msgs, tools, False)
                except Exception as e:
                    raise failed(e) from None
                cut = prefix_end(full, doc.train_from)
                ends = np.asarray(out.encodings[0].offsets, dtype=np.int64).reshape(-1, 2)[:, 1]
                mask[ends <= cut] = 0
            if trained_msgs and not mask.any():
                raise BadRecord(
                    f"field {fld!r}: the chat template's {{% generation %}} markers cover none of the"
                    " assistant's tokens, so they cannot be separated"
                )
            return ids, mask

        try:
            full = self._render(msgs, tools, False)
        except Exception as e:
            raise failed(e) from None
        enc = hf(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.uint32)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        spans = []
        for i in trained_msgs:
            if i == 0:
                raise BadRecord(
                    f"field {fld!r}: message 0 is the assistant's; without {{% generation %}} markers in the"
                    " chat template its tokens cannot be separated from what the template puts before it"
                )
            start = prefix_end(full, i)
            try:
                q = self._render(msgs[: i + 1], tools, False)
            except Exception as e:
                raise failed(e, "a prefix of it") from None
            if not full.startswith(q) or len(q) <= start:
                raise BadRecord(
                    f"field {fld!r}: the chat template renders assistant message {i} differently once"
                    " later turns follow, so the assistant's tokens cannot be separated"
                    " (a template with {% generation %} markers can; see --chat-template)"
                )
            spans.append((start, len(q)))
        mask = np.zeros(ids.shape[0], dtype=np.uint8)
        for s, e in spans:
            # transformers' rule: a token overlapping the span is the assistant's
            mask[(offsets[:, 1] > s) & (offsets[:, 0] < e)] = 1
        return ids, mask
