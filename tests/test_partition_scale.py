"""A thousand sites drawing their shares of one source: once per process, one line when empty."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import pytest
from flwr_datasets.partitioner import IidPartitioner

from fedllm.data import site_share, source_partitioner
from fedllm.errors import DataError

FIELDS = {"prompt_field": "prompt", "response_field": "response", "category_field": "category"}


def _partitioner(source: str, num_sites: int, scheme: str = "iid", seed: int = 0) -> object:
    return source_partitioner(
        source, **FIELDS, num_sites=num_sites, scheme=scheme, seed=seed, alpha=0.5
    )


def test_thousand_iid_sites_each_get_a_share_of_the_embedded_corpus() -> None:
    """1,000 iid shares of chatterbot: each non-empty, disjoint, and together every record."""
    # Prepare
    partitioner = _partitioner("chatterbot", 1000)
    # Execute
    sizes = [len(site_share(partitioner, site=i, num_sites=1000, scheme="iid")) for i in (0, 999)]
    # Assert
    total = len(partitioner.dataset)
    assert total > 2000
    # IidPartitioner's contiguous shards: the first total % n shards hold one record more
    assert sizes == [total // 1000 + 1, total // 1000]


def test_a_later_site_reuses_the_loaded_and_partitioned_source() -> None:
    """Site 999 of 1,000 after site 998: the same partitioner, and its share in milliseconds
    (each call loaded the source and cut all 1,000 shares, ~3-5 s, before the memo)."""
    # Prepare
    first = _partitioner("chatterbot", 1000, seed=11)
    site_share(first, site=998, num_sites=1000, scheme="iid")
    # Execute
    t0 = time.perf_counter()
    again = _partitioner("chatterbot", 1000, seed=11)
    share = site_share(again, site=999, num_sites=1000, scheme="iid")
    seconds = time.perf_counter() - t0
    # Assert
    assert again is first
    assert len(share) >= 2
    assert seconds < 0.5


def test_an_edited_file_source_is_read_again(tmp_path: Path) -> None:
    """The memo keys a file by size and modification time: new rows are seen."""
    # Prepare
    path = tmp_path / "data.jsonl"
    row = {"prompt": "p", "response": "r", "category": "c"}
    path.write_text("\n".join(json.dumps(row) for _ in range(4)) + "\n")
    before = _partitioner(str(path), 2)
    # Execute
    path.write_text("\n".join(json.dumps(row) for _ in range(6)) + "\n")
    after = _partitioner(str(path), 2)
    # Assert
    assert len(before.dataset) == 4
    assert len(after.dataset) == 6


def test_an_empty_share_is_one_line_naming_the_site() -> None:
    """A partitioner with more shares than records (as a hand-made or foreign one may be)
    leaves the last site empty: its error names that site and nothing else breaks."""
    # Prepare
    partitioner = IidPartitioner(num_partitions=5)
    partitioner.dataset = datasets.Dataset.from_dict(
        {"prompt": ["a", "b", "c"], "response": ["x", "y", "z"], "category": ["t"] * 3}
    )
    # Execute / Assert
    assert len(site_share(partitioner, site=0, num_sites=5, scheme="iid")) == 1
    with pytest.raises(DataError, match=r"^Site 4 received no examples") as caught:
        site_share(partitioner, site=4, num_sites=5, scheme="iid")
    assert "\n" not in str(caught.value)


def test_dirichlet_that_cannot_fill_a_thousand_sites_says_so_in_one_line() -> None:
    """Dirichlet on ~2.4k records cannot give 1,000 sites two records each: a DataError
    pointing at iid, not flwr-datasets' bare ValueError."""
    partitioner = _partitioner("chatterbot", 1000, scheme="dirichlet")
    with pytest.raises(DataError, match=r"could not split .* into 1000 sites .* iid"):
        site_share(partitioner, site=999, num_sites=1000, scheme="dirichlet")
