"""Datasets for experiments: the `Example` record, the generic JSONL format, synthetic data.

  ds = load_dataset("data/probe")            # data/probe/examples.jsonl, images beside it
  ds = load_dataset(write_synthetic(tmp))    # 50 coloured shapes, deterministic
"""

from narrowgate_jax.data.examples import (Dataset, Example, ListDataset, ShardedDataset,
                                          check_unique_ids, shard)
from narrowgate_jax.data.jsonl import JsonlDataset, load_dataset, read_jsonl, write_jsonl
from narrowgate_jax.data.synthetic import COLOURS, SHAPES, WORDS, write_synthetic

__all__ = [
    "COLOURS", "Dataset", "Example", "JsonlDataset", "ListDataset", "SHAPES", "ShardedDataset",
    "WORDS", "check_unique_ids", "load_dataset", "read_jsonl", "shard", "write_jsonl",
    "write_synthetic",
]

# GQA for the cross-modal study (official files and the study's CSVs), and its synthetic fixture.
from narrowgate_jax.data.gqa import TASKS, GqaDataset, GqaTask, load_gqa, load_gqa_csv  # noqa: E402
from narrowgate_jax.data.gqa_synthetic import write_synthetic_gqa  # noqa: E402

__all__ += ["GqaDataset", "GqaTask", "TASKS", "load_gqa", "load_gqa_csv", "write_synthetic_gqa"]
