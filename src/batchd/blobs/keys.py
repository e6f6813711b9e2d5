"""Every blob key batchd makes, in one place (keys are never user-supplied names).

    inputs/<file id>                             an uploaded file's bytes (any purpose)
    parts/<batch id>/<shard:06d>.<token>.<seq>   one checkpoint's result records of a shard
    parts/<batch id>/unexecuted                  the records of requests never executed
    outputs/<file id>                            a finalised batch's output or error file
"""

from __future__ import annotations


def input_key(file_id: str) -> str:
    """Where an uploaded file's bytes are stored."""
    return f"inputs/{file_id}"


def part_key(batch_id: str, shard_idx: int, token: int, seq: int) -> str:
    """One checkpoint's records: unique per shard holder (``token``) and checkpoint (``seq``),
    so a worker that lost its lease never overwrites its successor's part."""
    return f"parts/{batch_id}/{shard_idx:06d}.{token}.{seq}"


def unexecuted_key(batch_id: str) -> str:
    """The last part of a batch that ended with requests never executed."""
    return f"parts/{batch_id}/unexecuted"


def output_key(file_id: str) -> str:
    """A result file (output or error) of a finalised batch."""
    return f"outputs/{file_id}"
