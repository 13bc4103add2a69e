"""Training data: reading text / JSON / Parquet / dataset directories in the usual fine-tuning
formats, rendering chats with the model's chat template, tokenising once into a memory-mapped
cache, packing whole documents into sequences (positions restarting per document), holding out
eval data and shuffling deterministically by seed."""

from .cache import TokenFile, token_file
from .config import DataConfig
from .dataset import IGNORE_INDEX, PackedDataset, TrainingData, eval_split, load_dataset, load_training_data
from .inspect import inspect_data
from .packing import Batch, DocumentDataset
from .sources import chat_segments, data_files
from .tokenizer import TextTokenizer, eos_from_config, load_tokenizer, shipped_corpus_path, shipped_tokenizer_path

__all__ = [
    "TokenFile", "token_file", "IGNORE_INDEX", "PackedDataset", "load_dataset", "chat_segments",
    "data_files", "TextTokenizer", "eos_from_config", "shipped_corpus_path", "shipped_tokenizer_path",
    "DataConfig", "TrainingData", "load_training_data", "eval_split", "inspect_data", "Batch",
    "DocumentDataset", "load_tokenizer",
]
