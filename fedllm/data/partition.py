"""Split one source across sites with flwr-datasets partitioners.

This is how a simulation (and a test deployment, through a node's ``partition-id`` and
``num-partitions``) stands in for sites that each hold their own data; the partitioners are the
ones the Flower community uses, so the non-IID splits are comparable.
"""

from __future__ import annotations

import functools
import logging
import pathlib
from collections import Counter

import datasets
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)

from fedllm.data.sources import first_line, load_examples
from fedllm.errors import ConfigError, DataError

__all__ = ["PARTITION_SCHEMES", "partition_examples", "site_share", "source_partitioner"]

log = logging.getLogger(__name__)

PARTITION_SCHEMES = ("by-category", "dirichlet", "iid")
"""Names accepted by :func:`partition_examples` (config key ``data.partitioner``)."""

# Private name, so a source that already has a "site" column is not clobbered.
_SITE_COLUMN = "_fedllm_site"


def partition_examples(
    ds: datasets.Dataset,
    *,
    num_sites: int,
    scheme: str = "by-category",
    seed: int = 0,
    alpha: float = 0.5,
) -> list[datasets.Dataset]:
    """Split examples into one dataset per site with a flwr-datasets partitioner.

    Parameters
    ----------
    ds : datasets.Dataset
        Output of :func:`load_examples` (needs a ``category`` column except for ``iid``).
    num_sites : int
        Number of sites (Flower partitions) to produce.
    scheme : str (default: "by-category")
        ``"by-category"``: whole categories go to sites, so sites hold different topics (the
        realistic non-IID case: hospitals, departments). Categories are packed greedily,
        largest first, into the site with the fewest examples so far, which balances sizes as
        far as whole topics allow. ``"iid"``: a seeded shuffle cut into equal shards.
        ``"dirichlet"``: per-category shares drawn from Dir(``alpha``) (Hsu et al. 2019,
        arXiv 1909.06335).
    seed : int (default: 0)
        Seed for the ``iid`` shuffle and the Dirichlet draws.
    alpha : float (default: 0.5)
        Dirichlet concentration: small values give each site few categories.

    Returns
    -------
    list[datasets.Dataset]
        ``num_sites`` non-empty datasets with the columns of ``ds``; index ``i`` is site ``i``.

    Raises
    ------
    ConfigError
        If ``scheme`` is unknown or ``num_sites`` is below 1.
    DataError
        If the data cannot fill every site (too few categories or examples).
    """
    scheme = scheme.strip().lower()
    partitioner = _partitioner(ds, num_sites=num_sites, scheme=scheme, seed=seed, alpha=alpha)
    sites = [
        site_share(partitioner, site=i, num_sites=num_sites, scheme=scheme)
        for i in range(num_sites)
    ]
    log.info(
        "Partitioned %d examples into %d sites (%s): sizes %s",
        len(ds),
        num_sites,
        scheme,
        [len(site) for site in sites],
    )
    return sites


def source_partitioner(
    source: str,
    *,
    prompt_field: str,
    response_field: str,
    category_field: str | None,
    num_sites: int,
    scheme: str,
    seed: int,
    alpha: float,
) -> Partitioner:
    """The partitioner of `source` across `num_sites`, loaded and split once per process.

    One simulation process serves every virtual site in turn; loading the source and
    partitioning it again for each site's call made each call O(sites) (~5 s at 1,000
    sites). A local file's size and modification time are in the key, so an edited file is
    read again. Bounded: the two most recent (source, split) pairs, e.g. a run's and a test's.
    """
    return _cached_partitioner(
        source.strip(),
        _file_stamp(source),
        (prompt_field, response_field, category_field or None),
        (num_sites, scheme.strip().lower(), seed, alpha),
    )


def site_share(
    partitioner: Partitioner, *, site: int, num_sites: int, scheme: str
) -> datasets.Dataset:
    """Site `site`'s share of a prepared partitioner: O(its own share), not O(sites).

    Raises
    ------
    DataError
        If the share is empty, naming the site (one line).
    """
    empty = DataError(
        f"Site {site} received no examples from the {scheme} partitioner "
        f"({len(partitioner.dataset)} examples, {num_sites} sites); use fewer sites or more data."
    )
    try:
        share = partitioner.load_partition(site)
    except IndexError as e:  # `datasets` cannot cut an empty contiguous shard
        raise empty from e
    except ValueError as e:
        raise DataError(
            f"The {scheme} partitioner could not split {len(partitioner.dataset)} examples into "
            f"{num_sites} sites ({first_line(e)}); use fewer sites, more data or, for "
            "dirichlet, a larger data.dirichlet-alpha or the iid partitioner."
        ) from e
    if _SITE_COLUMN in share.column_names:
        share = share.remove_columns(_SITE_COLUMN)
    if len(share) == 0:
        raise empty
    return share


@functools.lru_cache(maxsize=2)
def _cached_partitioner(
    source: str,
    stamp: tuple[int, int] | None,
    fields: tuple[str, str, str | None],
    split: tuple[int, str, int, float],
) -> Partitioner:
    del stamp  # only in the key: an edited file is another entry
    prompt_field, response_field, category_field = fields
    num_sites, scheme, seed, alpha = split
    ds = load_examples(
        source,
        prompt_field=prompt_field,
        response_field=response_field,
        category_field=category_field,
    )
    return _partitioner(ds, num_sites=num_sites, scheme=scheme, seed=seed, alpha=alpha)


def _file_stamp(source: str) -> tuple[int, int] | None:
    """(size, mtime in ns) of a local file or folder source; None for the embedded corpus or
    a hub id."""
    path = pathlib.Path(source.strip()).expanduser()
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _partitioner(
    ds: datasets.Dataset, *, num_sites: int, scheme: str, seed: int, alpha: float
) -> Partitioner:
    """A flwr-datasets partitioner over `ds` (checked), ready to load any site's share."""
    scheme = scheme.strip().lower()
    if scheme not in PARTITION_SCHEMES:
        raise ConfigError(
            f"data.partitioner = '{scheme}' is not a known partitioner; use one of "
            f"{', '.join(PARTITION_SCHEMES)}."
        )
    if num_sites < 1:
        raise ConfigError(f"The number of sites must be at least 1, got {num_sites}.")
    if len(ds) < num_sites:
        raise DataError(
            f"{len(ds)} examples cannot fill {num_sites} sites; use fewer sites or more data."
        )
    partitioner: Partitioner
    if scheme == "by-category":
        ds, partitioner = _by_category(ds, num_sites=num_sites)
    elif scheme == "iid":
        # IidPartitioner cuts contiguous shards, and sources are usually ordered by topic:
        # shuffle first, or "iid" sites would each get a few topics.
        ds = ds.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=num_sites)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_sites,
            partition_by="category",
            alpha=alpha,
            # Two examples is the least a site can split into train and eval; ask for more when
            # the data allows, so no site ends up with a handful of examples.
            min_partition_size=max(2, min(10, len(ds) // (4 * num_sites))),
            seed=seed,
        )
    partitioner.dataset = ds
    return partitioner


def _by_category(
    ds: datasets.Dataset, *, num_sites: int
) -> tuple[datasets.Dataset, NaturalIdPartitioner]:
    """Assign whole categories to sites and return the data with a site-id column."""
    counts = Counter(ds["category"])
    if len(counts) < num_sites:
        raise DataError(
            f"Only {len(counts)} categories ({', '.join(sorted(counts))}) for {num_sites} sites: "
            "by-category needs at least one category per site; use fewer sites, the iid or "
            "dirichlet partitioner, or a data.category-field with more values."
        )
    loads = [0] * num_sites
    site_of: dict[str, int] = {}
    # Largest first into the emptiest site (ties: lower site index, then category name) is the
    # LPT heuristic: deterministic, and within 4/3 of the best possible largest site.
    for category, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        target = min(range(num_sites), key=lambda i: (loads[i], i))
        site_of[category] = target
        loads[target] += count
    for site in range(num_sites):
        topics = sorted(c for c, s in site_of.items() if s == site)
        log.debug("Site %d: %d examples in %s", site, loads[site], ", ".join(topics))
    with_site = ds.add_column(_SITE_COLUMN, [site_of[c] for c in ds["category"]])
    # Site ids are 0..num_sites-1 and NaturalIdPartitioner numbers sorted ids from 0, so
    # partition i is exactly site i.
    return with_site, NaturalIdPartitioner(partition_by=_SITE_COLUMN)
