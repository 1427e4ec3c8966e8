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

# The Narrow Gate study's data in the formats people have it (VQAv2 official files, Karpathy
# caption splits, ImageNet class folders, Hugging Face `datasets` folders and parquet), and
# fixtures of each. `datasets`/`pyarrow` are imported only when an hf_* dataset is read.
from narrowgate_jax.data.hf_datasets import load_hf_dataset  # noqa: E402
from narrowgate_jax.data.imagenet import load_imagenet_folders, read_class_mapping  # noqa: E402
from narrowgate_jax.data.karpathy import load_karpathy  # noqa: E402
from narrowgate_jax.data.ng_common import CAPTION_PROMPT, IMAGENET_PROMPT  # noqa: E402
from narrowgate_jax.data.ng_common import VQA_PROMPT, NgDataset  # noqa: E402
from narrowgate_jax.data.ng_synthetic import write_ng_fixtures  # noqa: E402
from narrowgate_jax.data.vqav2 import load_vqav2  # noqa: E402

__all__ += ["CAPTION_PROMPT", "IMAGENET_PROMPT", "NgDataset", "VQA_PROMPT", "load_hf_dataset",
            "load_imagenet_folders", "load_karpathy", "load_vqav2", "read_class_mapping",
            "write_ng_fixtures"]
