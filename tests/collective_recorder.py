"""Runs ``sd_ds.train.main`` on one rank with every ``torch.distributed`` collective wrapped: each call that
sd_ds code issues (the first frame outside torch is in sd_ds/) is recorded with the group it names, and the
record is written to ``$SD_DS_COLLECTIVES_OUT/rank{RANK}.json`` at exit. Used by tests/test_control_plane.py."""

from __future__ import annotations

import atexit
import json
import os
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

COLLECTIVES = ("all_reduce", "broadcast", "barrier", "broadcast_object_list", "all_gather", "all_gather_object",
               "gather", "gather_object", "reduce", "reduce_scatter", "scatter", "all_to_all", "monitored_barrier")
SD_DS = str(Path(__file__).resolve().parents[1] / "sd_ds")
records: list[dict] = []
control_group: list = []


def caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" in frame.filename or frame.filename == __file__:
            continue
        return f"{frame.filename}:{frame.lineno}"
    return "?"


def wrap(name: str):
    original = getattr(dist, name)

    def wrapper(*args, **kwargs):
        where = caller()
        if where.startswith(SD_DS):
            group = kwargs.get("group")
            records.append({"op": name, "where": where[len(SD_DS) + 1:],
                            "group": "none" if group is None else
                            ("control" if control_group and group is control_group[0] else "other")})
        return original(*args, **kwargs)

    return wrapper


def main() -> None:
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name))
    import sd_ds.distributed
    import sd_ds.train

    original_init = sd_ds.distributed.init_distributed

    def init():
        info = original_init()
        control_group.append(info.control_group)
        return info

    sd_ds.train.init_distributed = init
    out = Path(os.environ["SD_DS_COLLECTIVES_OUT"])
    atexit.register(lambda: (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(records)))
    from sd_ds.lifecycle import run_to_exit

    sys.exit(run_to_exit(lambda: sd_ds.train.main(sys.argv[1:])))  # leaves as the trainer's own __main__ does


if __name__ == "__main__":
    main()
