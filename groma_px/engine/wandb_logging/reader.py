"""``read_offline_run``: what an offline W&B run wrote, read back from its ``run-*.wandb`` file.

wandb 0.31 has no reader for these files. The format (wandb's ``datastore``, LevelDB-log style):
a 7-byte header (``:W&B``, little-endian ``0xBEE1``, version 0), then 32 KiB blocks counted from
the start of the file. Each block holds records with a 7-byte header (CRC-32 of the type byte and
payload, payload length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4); a record that does not fit
is split into FIRST, MIDDLE..., LAST pieces, and a block tail shorter than 7 bytes is zero
padding. A reassembled payload is a ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_MAGIC = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32 * 1024
_RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def find_offline_runs(directory: str | Path, *, wait_s: float = 0.0) -> list[Path]:
    """Every ``run-*.wandb`` file under ``directory``, in the order the runs started (folder
    timestamp, then the run record's start time).

    Args:
        directory: A ``dir`` given to ``wandb.init`` or any folder above it.
        wait_s: Seconds to wait for each run's exit record first (see
            :func:`read_offline_run`): a file not yet on disk has no start time to order by.
            Defaults to 0.
    """
    paths = list(Path(directory).rglob("run-*.wandb"))
    for path in paths if wait_s > 0 else []:
        read_offline_run(path, wait_s=wait_s)
    # Run folders are named offline-run-YYYYMMDD_HHMMSS-<id> (one-second resolution).
    return sorted(paths, key=lambda p: (p.parent.name.split("-")[-2:-1], _start_time(p), str(p)))


def read_offline_run(path: str | Path, *, wait_s: float = 0.0) -> dict[str, Any]:
    """What one offline run logged.

    wandb 0.31 writes the file in 32 KiB blocks from a background process, and
    ``run.finish()`` may return before the last block is on disk (seen in about one run in
    four): pass ``wait_s`` to poll until the run's exit record is there.

    Args:
        path: A ``run-*.wandb`` file, or a folder holding exactly one (e.g. an
            ``offline-run-*`` folder).
        wait_s: Seconds to wait for the exit record. Defaults to 0 (read what is there).

    Returns:
        ``run`` (id, project, group, name, tags), ``config`` (the final config), ``history``
        (one dict per committed step, values decoded from JSON; a logged dict or media object
        (``{"_type": "histogram", ...}``, ``{"_type": "table-file", ...}``) stays a nested
        dict), ``summary`` (the final summary, nested likewise), ``artifacts`` (name, type and
        ``files``: artifact path -> local staging path, e.g. the images of a logged table),
        ``files`` (paths, relative to the run's ``files/`` folder, that the run saved) and
        ``exit_code`` (None while the run has not ended).

    Raises:
        FileNotFoundError: If ``path`` is a folder without exactly one run file.
        ValueError: If the file is not a W&B run file or a record fails its checksum.
        TimeoutError: If ``wait_s`` passed without an exit record.
    """
    path = _run_file(Path(path))
    deadline = time.monotonic() + wait_s
    while True:
        out = _read(path)
        if out["exit_code"] is not None or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if wait_s > 0 and out["exit_code"] is None:
        raise TimeoutError(f"{path}: no exit record after {wait_s} s (is the run still going?)")
    return out


def _read(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"run": {}, "config": {}, "history": [], "summary": {}}
    out.update(artifacts=[], files=[], exit_code=None)
    for record in _records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out["run"] = {
                "id": run.run_id,
                "project": run.project,
                "group": run.run_group,
                "name": run.display_name,
                "tags": list(run.tags),
            }
            _apply(out["config"], run.config.update, run.config.remove)
        elif kind == "config":
            _apply(out["config"], record.config.update, record.config.remove)
        elif kind == "summary":
            _apply(out["summary"], record.summary.update, record.summary.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            _apply(row, record.history.item, ())
            out["history"].append(row)
        elif kind == "files":
            out["files"] += [f.path for f in record.files.files]
        elif kind == "artifact":
            art = record.artifact
            files = {c.path: c.local_path for c in art.manifest.contents}
            out["artifacts"].append({"name": art.name, "type": art.type, "files": files})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def logged_table(run: dict[str, Any], key: str) -> dict[str, Any]:
    """The full table logged under ``key``, from the artifact wandb staged for it (the copy in
    the run's ``files/`` folder holds only placeholders for images).

    Args:
        run: What :func:`read_offline_run` returned.
        key: The logged key, e.g. ``"test/examples"``.

    Returns:
        The table JSON (``columns``, ``data``; an image cell is ``{"_type": "image-file",
        "path": ...}``) plus ``files``: the artifact's paths -> local staging paths.

    Raises:
        KeyError: If no artifact of the run holds ``{key}.table.json``.
    """
    for artifact in run["artifacts"]:
        local = artifact["files"].get(f"{key}.table.json")
        if local is not None:
            table = json.loads(Path(local).read_text())
            return {**table, "files": artifact["files"]}
    raise KeyError(f"run {run['run'].get('id')!r} logged no table artifact for {key!r}")


def _run_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = find_offline_runs(path) if path.is_dir() else []
    if len(found) != 1:
        raise FileNotFoundError(f"{path}: expected one run-*.wandb file, found {len(found)}")
    return found[0]


def _start_time(path: Path) -> float:
    """The run's start time (from its run record; 0 if the file has none yet)."""
    for record in _records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.start_time.seconds + record.run.start_time.nanos * 1e-9
    return 0.0


def _records(path: Path) -> Iterator[Any]:
    """The file's records, parsed, in order (a torn tail is dropped)."""
    from wandb.proto import wandb_internal_pb2  # deferred: wandb is slow to import

    data = path.read_bytes()
    if not data.startswith(_MAGIC):
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    pieces, pos = [], len(_MAGIC)
    while True:
        if _BLOCK - pos % _BLOCK < _RECORD_HEADER.size:
            pos += _BLOCK - pos % _BLOCK  # zero padding at the end of a block
        if pos + _RECORD_HEADER.size > len(data):
            return
        crc, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        start = pos + _RECORD_HEADER.size
        piece = data[start : start + length]
        if len(piece) < length or (crc == 0 and length == 0 and kind == 0):
            return  # torn or zero-filled tail of a file still being written
        if zlib.crc32(bytes([kind]) + piece) != crc:
            raise ValueError(f"{path}: record at byte {pos} fails its CRC-32 check")
        pieces.append(piece)
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record
        pos = start + length


def _apply(target: dict[str, Any], updates: Any, removes: Any) -> None:
    """Sets each item's decoded value at its key path (``key``, or ``nested_key`` for a value
    inside a logged dict), then deletes the ``removes`` key paths."""
    for item in updates:
        keys = [item.key] if item.key else list(item.nested_key)
        node = target
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = _value(item)
    for item in removes:
        keys = [item.key] if item.key else list(item.nested_key)
        node = target
        for key in keys[:-1]:
            node = node.get(key, {})
        node.pop(keys[-1], None)


def _value(item: Any) -> Any:
    """An item's value: ``value_json`` decoded, or the typed field newer writers may use."""
    which = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if which is None or which == "value_json":
        return json.loads(item.value_json) if item.value_json else None
    if which == "none":
        return None
    return json.loads(item.json) if which == "json" else getattr(item, which)
