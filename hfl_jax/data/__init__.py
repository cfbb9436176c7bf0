"""Federated data: GLUE / custom text datasets, tokenization, non-IID partitioning and the
device-major layout used under `vmap`. See docs/data.md."""

from hfl_jax.data.device_data import (
    DeviceData,
    EvalBatches,
    eval_batches,
    gather_batches,
    make_device_data,
    sample_batch_indices,
    bucket_length,
    trim_padding,
)
from hfl_jax.data.partition import (
    PARTITIONERS,
    PartitionError,
    dirichlet,
    iid,
    partition,
    pathological,
    quantity,
)
from hfl_jax.data.report import KL_EPS, PartitionReport, kl_divergence, partition_report, plot_partition
from hfl_jax.data.tasks import (
    TASK_NAMES,
    TASKS,
    CustomSpec,
    DataError,
    DataNotFoundError,
    TaskSpec,
    TextDataset,
    load_task,
)
from hfl_jax.data.tokenize import load_tokenizer, resolve_tokenizer, tokenize_dataset

__all__ = [
    "TASKS", "TASK_NAMES", "TaskSpec", "CustomSpec", "TextDataset", "DataError",
    "DataNotFoundError", "load_task",
    "tokenize_dataset", "load_tokenizer", "resolve_tokenizer",
    "partition", "iid", "dirichlet", "pathological", "quantity", "PARTITIONERS", "PartitionError",
    "partition_report", "plot_partition", "PartitionReport", "kl_divergence", "KL_EPS",
    "DeviceData", "make_device_data", "sample_batch_indices", "gather_batches",
    "EvalBatches", "eval_batches", "bucket_length", "trim_padding",
]
