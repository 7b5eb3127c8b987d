"""Arrow IPC stream files on Ray Data: the format the `datasets` package writes (`save_to_disk` shards, the files of
its cache), read in Ray tasks like any other file format, one column kept as "text"."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from raytrain.data.text import DataError


class ArrowStreamFiles(FileBasedDatasource):
    """Each file's record batches, as tables of one column "text" taken from `column`."""

    def __init__(self, paths: list[str], column: str) -> None:
        super().__init__(paths)
        self.column = column

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[Any]:
        for batch in pa.ipc.open_stream(f):
            yield pa.table({"text": batch.column(self.column)})


def check_column(file: str, column: str) -> None:
    """`file` is an Arrow IPC stream with column `column` (checked in the driver, before any task reads)."""
    try:
        with pa.memory_map(file) as source:
            names = pa.ipc.open_stream(source).schema.names
    except pa.ArrowInvalid as e:
        raise DataError(f"data.path: {file} is not an Arrow IPC stream, the format the datasets package writes "
                        f"({e})") from None
    if column not in names:
        raise DataError(f"data.text_field={column}: {file} has no such column (columns: {', '.join(names)})")
