"""A site trains on its own data at its own path: the node config names it, the run config
(the coordinator's) names none of it, and nothing is partitioned (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from flwr.app import Context, RecordDict

from fedllm.config import parse_config
from fedllm.errors import DataError
from fedllm.mods.context import local_data
from fedllm.site import LocalData, load_site_data, tokenizer_for


def _rows(n: int, topic: str) -> list[dict[str, str]]:
    return [
        {"q": f"Tell me about {topic} ({i}).", "a": f"{topic} is fine ({i})."} for i in range(n)
    ]


@pytest.fixture()
def cfg(tiny_model_dir: Path, tmp_path: Path) -> object:
    # The run config names a data source that does not exist: a site with its own data
    # must never read it.
    return parse_config(
        {"model.name": str(tiny_model_dir), "data.source": str(tmp_path / "nowhere.jsonl")}
    )


def _write(tmp_path: Path, kind: str, rows: list[dict[str, str]]) -> Path:
    if kind == "jsonl":
        path = tmp_path / "records.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        path = tmp_path / "records.csv"
        path.write_text("q,a\n" + "".join(f'"{r["q"]}","{r["a"]}"\n' for r in rows))
    else:
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize(("kind", "rows"), [("jsonl", 40), ("csv", 25), ("saved", 60)])
def test_a_site_trains_on_every_record_of_its_own_file_and_never_reads_the_runs_source(
    cfg: object, tmp_path: Path, kind: str, rows: int
) -> None:
    path = _write(tmp_path, kind, _rows(rows, kind))
    local = LocalData(str(path), prompt_field="q", response_field="a")
    data = load_site_data(cfg, site=2, num_sites=3, tokenizer=tokenizer_for(cfg), local=local)
    assert len(data.train) + len(data.eval) == rows  # its whole file: nothing partitioned
    assert len(data.eval) >= 1 and data.categories == ["all"]


def test_the_node_config_names_the_sites_data_and_its_fields() -> None:
    context = Context(
        1,
        7,
        {"data": "/srv/site/records.csv", "data-prompt-field": "q", "data-response-field": "a"},
        RecordDict(),
        {},
    )
    assert local_data(context) == LocalData("/srv/site/records.csv", "q", "a", "")
    assert local_data(Context(1, 7, {"partition-id": 0}, RecordDict(), {})) is None


def test_a_missing_local_data_path_is_named_with_its_node_config_key(
    cfg: object, tmp_path: Path
) -> None:
    local = LocalData(str(tmp_path / "absent.jsonl"))
    with pytest.raises(DataError, match=r"site 1: node config 'data' = '.*absent.jsonl'") as e:
        load_site_data(cfg, site=1, num_sites=3, tokenizer=tokenizer_for(cfg), local=local)
    assert "\n" not in str(e.value)


def test_a_local_file_without_the_mapped_fields_is_refused_naming_them(
    cfg: object, tmp_path: Path
) -> None:
    path = _write(tmp_path, "jsonl", _rows(10, "x"))
    with pytest.raises(DataError, match=r"node config 'data'.*prompt"):
        load_site_data(
            cfg, site=0, num_sites=3, tokenizer=tokenizer_for(cfg), local=LocalData(str(path))
        )


def test_the_records_fingerprint_ignores_order_and_split_but_not_content() -> None:
    from fedllm.site import records_fingerprint

    rows = _rows(6, "x")
    a = datasets.Dataset.from_dict(
        {"prompt": [r["q"] for r in rows], "response": [r["a"] for r in rows]}
    )
    shuffled = a.shuffle(seed=3)
    edited = a.map(
        lambda r, i: {"response": r["response"] + ("!" if i == 2 else "")}, with_indices=True
    )
    assert records_fingerprint(a) == records_fingerprint(shuffled)
    assert records_fingerprint(a) != records_fingerprint(edited)
    assert records_fingerprint(a) != records_fingerprint(a.select(range(5)))


def test_a_folder_of_one_file_per_site_gives_natural_sites(cfg: object, tmp_path: Path) -> None:
    """In simulation, `data.source` may be a folder with one file per site (sorted by name):
    site k trains on the k-th file only, nothing is partitioned."""
    from fedllm.config import parse_config

    folder = tmp_path / "sites"
    folder.mkdir()
    sizes = {"a-clinic.jsonl": 12, "b-lab.jsonl": 20, "c-bank.jsonl": 30}
    for name, n in sizes.items():
        rows = [{"prompt": f"{name} question {i}?", "response": "yes."} for i in range(n)]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    natural = parse_config({"model.name": cfg.model.name, "data.source": str(folder)})
    tok = tokenizer_for(natural)
    got = [load_site_data(natural, site=k, num_sites=3, tokenizer=tok) for k in range(3)]
    assert [len(d.train) + len(d.eval) for d in got] == list(sizes.values())
    with pytest.raises(DataError, match=r"holds 3 site files but the federation has 4 sites"):
        load_site_data(natural, site=0, num_sites=4, tokenizer=tok)


def test_a_saved_dataset_folder_is_one_source_not_natural_sites(tmp_path: Path) -> None:
    from fedllm.data import site_files

    _write(tmp_path, "saved", _rows(4, "x"))
    assert site_files(str(tmp_path / "saved")) is None
    assert site_files(str(tmp_path / "missing")) is None


def test_a_folder_of_files_is_one_sites_data_read_whole(cfg: object, tmp_path: Path) -> None:
    """A site's `data` may be a folder of files (a JSONL and a CSV here): every record of
    every file is the site's, and nothing is partitioned."""
    folder = tmp_path / "mine"
    folder.mkdir()
    _write(folder, "jsonl", _rows(20, "moss"))
    _write(folder, "csv", _rows(15, "ferns"))
    local = LocalData(path=str(folder), prompt_field="q", response_field="a")
    tok = tokenizer_for(cfg)
    data = load_site_data(cfg, site=0, num_sites=3, tokenizer=tok, local=local)
    assert len(data.train) + len(data.eval) == 35
