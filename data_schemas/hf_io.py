"""Records from a Hugging Face ``datasets`` source (``data: {hf: {path: ..., split: train}}``): a Parquet, Arrow,
JSON/JSONL or CSV file, a ``save_to_disk`` folder, or a hub id (where the user has access). Every row is
validated like a JSONL row (our schema or TRL's), a bad one named as ``SOURCE:ROW: field 'x': reason``
(rows counted from 1). Arrow data is memory-mapped by ``datasets``; rows are read one at a time."""

from __future__ import annotations

from pathlib import Path

from data_schemas.io import DataError, Records, parse_record

BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def describe(source) -> str:
    """How a source is named in messages: the path, with the split (and subset) when they matter."""
    extra = [f"{k}={v}" for k, v in (("name", source.name), ("split", source.split)) if v]
    return f"{source.path}[{', '.join(extra)}]" if extra else str(source.path)


def open_dataset(source):
    """The ``datasets.Dataset`` of ``source`` (one split)."""
    import datasets

    path = Path(source.path).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if source.split not in ds:
                raise DataError(f"no split '{source.split}' (it has {', '.join(ds)})", path=str(path))
            ds = ds[source.split]
        return ds
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"unknown file type '{path.suffix}' (known: {', '.join(BUILDERS)})", path=str(path))
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    return datasets.load_dataset(source.path, source.name, split=source.split, revision=source.revision)


def read_hf(source, kind, skip_bad: bool = False) -> Records:
    """Every row of ``source`` validated into records of ``kind`` (bad rows skipped and counted with
    ``skip_bad``, else the first one raises :class:`DataError`)."""
    where, out = describe(source), Records()
    for n, row in enumerate(open_dataset(source), 1):
        try:
            out.append(parse_record(_plain(row), kind, path=where, line=n))
        except DataError as err:
            if not skip_bad:
                raise
            out.skip(err)
    return out


def _plain(row: dict) -> dict:
    """A datasets row as the JSON row it stands for: columns a row does not fill (None) are left out."""
    return {k: v for k, v in row.items() if v is not None}
