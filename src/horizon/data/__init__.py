"""Training data: reading text / JSONL / chat JSONL, tokenising once into a memory-mapped cache,
packing into sequences and shuffling deterministically by seed."""

from .cache import TokenFile, token_file
from .dataset import IGNORE_INDEX, PackedDataset, load_dataset
from .sources import chat_segments, data_files
from .tokenizer import TextTokenizer, eos_from_config, shipped_corpus_path, shipped_tokenizer_path

__all__ = [
    "TokenFile", "token_file", "IGNORE_INDEX", "PackedDataset", "load_dataset", "chat_segments",
    "data_files", "TextTokenizer", "eos_from_config", "shipped_corpus_path", "shipped_tokenizer_path",
]
