"""Load instruction data, split it across sites, and turn it into chat-formatted training ids.

- `sources`: every source (the embedded chatterbot corpus, a local JSONL/JSON/CSV file, a
  directory written by ``Dataset.save_to_disk``, or a Hugging Face hub id) normalised to one
  shape, a ``datasets.Dataset`` with the string columns ``prompt``, ``response`` and ``category``;
  a folder of one data file per site (``site_files``) gives natural sites in simulation.
- `partition`: sites carved out of it with flwr-datasets partitioners (what simulations and
  test deployments stand in for real sites with), so the non-IID splits are the ones the Flower
  community uses.
- `tokenize`: the train/held-out split, and tokenisation through the model's own chat template
  with the loss on the answer only: the prompt and the padding are labelled ``-100``.

Nothing here imports Flower itself; errors a user can fix are :class:`~fedllm.errors.DataError`
or :class:`~fedllm.errors.ConfigError` with a one-sentence message.
"""

from fedllm.data.partition import (
    PARTITION_SCHEMES,
    partition_examples,
    site_share,
    source_partitioner,
)
from fedllm.data.sources import (
    COLUMNS,
    DEFAULT_CATEGORY,
    EMBEDDED_SOURCE,
    load_examples,
    load_site_examples,
    site_files,
)
from fedllm.data.tokenize import IGNORE_INDEX, collate_batch, split_train_eval, tokenize_examples

__all__ = [
    "COLUMNS",
    "DEFAULT_CATEGORY",
    "EMBEDDED_SOURCE",
    "IGNORE_INDEX",
    "PARTITION_SCHEMES",
    "collate_batch",
    "load_examples",
    "load_site_examples",
    "partition_examples",
    "site_files",
    "site_share",
    "source_partitioner",
    "split_train_eval",
    "tokenize_examples",
]
