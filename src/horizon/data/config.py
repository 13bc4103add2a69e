"""The data options of a run: what to train and evaluate on, how records are read, how documents
become sequences, and the shape of a step's batch. Options are `option(...)` fields (horizon/options.py):
default, help and rule written once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..options import ConfigError, check_fields, flag, option

PACKING = ("on", "off")
LONG_DOCUMENTS = ("truncate", "split", "drop")

# The names a record's fields are looked up by; `--field-map` maps these to a data set's own names.
RECORD_FIELDS = (
    "text", "messages", "conversations", "instruction", "input", "output", "prompt", "completion",
    "system", "tools", "history",
)
MESSAGE_FIELDS = ("role", "content", "from", "value")
MAPPABLE_FIELDS = RECORD_FIELDS + MESSAGE_FIELDS


def parse_field_map(value) -> dict[str, str]:
    """`"messages=dialog,content=text"` (or a dict) -> {"messages": "dialog", "content": "text"}:
    our field name on the left, the data set's on the right."""
    opt = flag("field_map")
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        out = {}
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            ours, sep, theirs = part.partition("=")
            if not sep:
                raise ConfigError(f"{opt} takes OURS=THEIRS pairs separated by commas, got {part!r}", "field_map")
            out[ours.strip()] = theirs.strip()
        value = out
    if not isinstance(value, dict):
        raise ConfigError(f"{opt} must be OURS=THEIRS pairs (e.g. messages=dialog), got {value!r}", "field_map")
    seen: dict[str, str] = {}
    for ours, theirs in value.items():
        if ours not in MAPPABLE_FIELDS:
            raise ConfigError(f"{opt}: unknown field {ours!r} (known: {', '.join(MAPPABLE_FIELDS)})", "field_map")
        if not isinstance(theirs, str) or not theirs:
            raise ConfigError(f"{opt}: the name mapped to {ours!r} must be a non-empty string, got {theirs!r}", "field_map")
        if theirs in seen:
            raise ConfigError(f"{opt}: {theirs!r} is mapped to both {seen[theirs]!r} and {ours!r}", "field_map")
        seen[theirs] = ours
    return dict(value)


@dataclass
class DataConfig:
    data: list[str] = option(help="training data: files or directories (.txt, .jsonl, .json, .parquet, Hugging Face "
                                  "save_to_disk directories)", factory=list, metavar="PATH", path=True, nargs="+",
                             default_help="the shipped corpus")
    seq_len: int = option(128, "tokens per sequence", ge=2, metavar="N")
    batch_size: int = option(8, "sequences per optimizer step", ge=1, metavar="N")
    eval_data: list[str] = option(help="held-out evaluation data, in the same formats as --data", factory=list,
                                  metavar="PATH", path=True, nargs="+")
    eval_fraction: float | None = option(None, "hold out this fraction of the training documents (chosen by "
                                         "content and --seed) for evaluation", gt=0.0, lt=1.0, metavar="F")
    eval_every: int = option(0, "evaluate every N steps when there is eval data (0: only at the end of the run)",
                             ge=0, metavar="N")
    packing: str = option("on", "on: pack whole documents into each sequence (positions restart per document); "
                          "off: one document per sequence, padded", choices=PACKING)
    long_documents: str = option("split", "a document longer than --seq-len: split into pieces (one token of "
                                 "overlap), truncate it, or drop it", choices=LONG_DOCUMENTS)
    skip_bad_records: bool = option(False, "skip records that cannot be read (counted and reported) instead of "
                                    "stopping at the first")
    field_map: dict = option(help="read other field names: OURS=THEIRS pairs, e.g. messages=dialog,content=text",
                             factory=dict, metavar="MAP")
    chat_template: str | None = option(None, "a Jinja chat template file to render chat data with, instead of "
                                       "the model's", metavar="FILE", path=True)

    def __post_init__(self):
        if isinstance(self.packing, bool):
            self.packing = "on" if self.packing else "off"
        self.field_map = parse_field_map(self.field_map)
        check_fields(self)
        if self.eval_fraction is not None and self.eval_data:
            raise ConfigError(f"{flag('eval_fraction')} and {flag('eval_data')} exclude each other; give one",
                              "eval_fraction")

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_data) or self.eval_fraction is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


__all__ = ["DataConfig", "PACKING", "LONG_DOCUMENTS", "MAPPABLE_FIELDS", "parse_field_map"]
