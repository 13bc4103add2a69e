"""The data options of a run: one dataclass field per option, each with its default and a one-line
help (`metadata["help"]`; `metadata["choices"]` where the values are a fixed set), validated in
`__post_init__` with one-line errors that name the option as its command-line flag."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..errors import HorizonError

PACKING = ("on", "off")
LONG_DOCUMENTS = ("truncate", "split", "drop")

# The names a record's fields are looked up by; `--field-map` maps these to a data set's own names.
RECORD_FIELDS = (
    "text", "messages", "conversations", "instruction", "input", "output", "prompt", "completion",
    "system", "tools", "history",
)
MESSAGE_FIELDS = ("role", "content", "from", "value")
MAPPABLE_FIELDS = RECORD_FIELDS + MESSAGE_FIELDS


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
                raise HorizonError(f"{opt} takes OURS=THEIRS pairs separated by commas, got {part!r}")
            out[ours.strip()] = theirs.strip()
        value = out
    if not isinstance(value, dict):
        raise HorizonError(f"{opt} must be OURS=THEIRS pairs (e.g. messages=dialog), got {value!r}")
    seen: dict[str, str] = {}
    for ours, theirs in value.items():
        if ours not in MAPPABLE_FIELDS:
            raise HorizonError(f"{opt}: unknown field {ours!r} (known: {', '.join(MAPPABLE_FIELDS)})")
        if not isinstance(theirs, str) or not theirs:
            raise HorizonError(f"{opt}: the name mapped to {ours!r} must be a non-empty string, got {theirs!r}")
        if theirs in seen:
            raise HorizonError(f"{opt}: {theirs!r} is mapped to both {seen[theirs]!r} and {ours!r}")
        seen[theirs] = ours
    return dict(value)


@dataclass
class DataConfig:
    data: list = field(default_factory=list, metadata={
        "help": "training data: files or directories (.txt, .jsonl, .json, .parquet, Hugging Face"
                " save_to_disk directories); default: the shipped corpus",
        "metavar": "PATH", "nargs": "+"})
    eval_data: list = field(default_factory=list, metadata={
        "help": "held-out evaluation data, in the same formats as --data", "metavar": "PATH", "nargs": "+"})
    eval_fraction: float | None = field(default=None, metadata={
        "help": "hold out this fraction of the training documents (chosen by content and --seed) for evaluation",
        "metavar": "F"})
    eval_every: int = field(default=0, metadata={
        "help": "evaluate every N steps when there is eval data (0: only at the end of the run)", "metavar": "N"})
    packing: str = field(default="on", metadata={
        "help": "on: pack whole documents into each sequence (positions restart per document);"
                " off: one document per sequence, padded",
        "choices": PACKING})
    long_documents: str = field(default="split", metadata={
        "help": "a document longer than --seq-len: split into pieces (one token of overlap), truncate it,"
                " or drop it",
        "choices": LONG_DOCUMENTS})
    skip_bad_records: bool = field(default=False, metadata={
        "help": "skip records that cannot be read (counted and reported) instead of stopping at the first"})
    field_map: dict = field(default_factory=dict, metadata={
        "help": "read other field names: OURS=THEIRS pairs, e.g. messages=dialog,content=text",
        "metavar": "MAP"})
    chat_template: str | None = field(default=None, metadata={
        "help": "a Jinja chat template file to render chat data with, instead of the model's", "metavar": "FILE"})

    def __post_init__(self):
        for name in ("data", "eval_data"):
            v = getattr(self, name)
            if v is None:
                v = []
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) and p for p in v):
                raise HorizonError(f"{flag(name)} must be a list of paths, got {v!r}")
            setattr(self, name, list(v))
        f = self.eval_fraction
        if f is not None:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0.0 < float(f) < 1.0):
                raise HorizonError(f"{flag('eval_fraction')} must be in (0, 1), got {f!r}")
            self.eval_fraction = float(f)
            if self.eval_data:
                raise HorizonError(f"{flag('eval_fraction')} and {flag('eval_data')} exclude each other; give one")
        e = self.eval_every
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise HorizonError(f"{flag('eval_every')} must be an integer >= 0, got {e!r}")
        if isinstance(self.packing, bool):
            self.packing = "on" if self.packing else "off"
        if self.packing not in PACKING:
            raise HorizonError(f"{flag('packing')} must be one of {', '.join(PACKING)}, got {self.packing!r}")
        if self.long_documents not in LONG_DOCUMENTS:
            raise HorizonError(
                f"{flag('long_documents')} must be one of {', '.join(LONG_DOCUMENTS)}, got {self.long_documents!r}"
            )
        if not isinstance(self.skip_bad_records, bool):
            raise HorizonError(f"{flag('skip_bad_records')} must be true or false, got {self.skip_bad_records!r}")
        self.field_map = parse_field_map(self.field_map)
        if self.chat_template is not None and (not isinstance(self.chat_template, str) or not self.chat_template):
            raise HorizonError(f"{flag('chat_template')} must be a file path, got {self.chat_template!r}")

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_data) or self.eval_fraction is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


__all__ = ["DataConfig", "PACKING", "LONG_DOCUMENTS", "MAPPABLE_FIELDS", "parse_field_map", "flag"]
