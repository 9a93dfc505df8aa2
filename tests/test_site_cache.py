"""The per-process memo of a site's data (`fedllm.site.site_data_for`): its key covers every
setting `load_site_data` reads, so a changed setting never serves stale data."""

from __future__ import annotations

from typing import Any

import pytest

from fedllm import site
from fedllm.config import FedllmConfig, parse_config


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[FedllmConfig]:
    """Every config `load_site_data` is called with, with a fake loader and tokenizer (no
    model, no data) and an empty memo."""
    calls: list[FedllmConfig] = []

    def fake_load(
        cfg: FedllmConfig, *, site: int, num_sites: int, tokenizer: object, local: object
    ) -> Any:
        calls.append(cfg)
        return object()

    monkeypatch.setattr(site, "_SITE_DATA", {})
    monkeypatch.setattr(site, "tokenizer_for", lambda cfg, *_a, **_k: "tokenizer")
    monkeypatch.setattr(site, "load_site_data", fake_load)
    return calls


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("audit.canaries", 1000),
        ("audit.gradient-canaries", 1000),
        ("audit.canary-site", 1),
        ("audit.canary-seed", 7),
        ("audit.secrets", 2),
        ("train.device", "cpu"),
        ("data.max-length", 64),
        ("safety.screen-site-data", True),
    ],
)
def test_a_setting_that_load_site_data_reads_gets_its_own_memo_entry(
    loads: list[FedllmConfig], key: str, value: object
) -> None:
    """Changing `key` loads the site's data again instead of serving the memoised copy."""
    # Prepare
    base, changed = parse_config({}), parse_config({key: value})
    first, _ = site.site_data_for(base, site=0, num_sites=3)
    # Execute
    again, _ = site.site_data_for(base, site=0, num_sites=3)
    other, _ = site.site_data_for(changed, site=0, num_sites=3)
    # Assert
    assert again is first
    assert other is not first
    assert len(loads) == 2 and loads[1] is changed


def test_a_setting_load_site_data_ignores_reuses_the_memo(loads: list[FedllmConfig]) -> None:
    """A training-only setting (the learning rate) does not reload the data."""
    # Prepare
    first, _ = site.site_data_for(parse_config({}), site=0, num_sites=3)
    # Execute
    again, _ = site.site_data_for(parse_config({"train.learning-rate": 0.5}), site=0, num_sites=3)
    # Assert
    assert again is first and len(loads) == 1


def test_a_sites_own_data_or_its_field_mapping_gets_its_own_memo_entry(
    loads: list[FedllmConfig],
) -> None:
    """A site that names (other) data of its own in its node config loads it again."""
    # Prepare
    cfg = parse_config({})
    shared, _ = site.site_data_for(cfg, site=0, num_sites=3)
    # Execute
    own, _ = site.site_data_for(cfg, site=0, num_sites=3, local=site.LocalData("/a.jsonl"))
    mapped, _ = site.site_data_for(
        cfg, site=0, num_sites=3, local=site.LocalData("/a.jsonl", prompt_field="q")
    )
    again, _ = site.site_data_for(cfg, site=0, num_sites=3, local=site.LocalData("/a.jsonl"))
    # Assert
    assert len({id(shared), id(own), id(mapped)}) == 3
    assert again is own and len(loads) == 3
