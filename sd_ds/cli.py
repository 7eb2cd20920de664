"""``sd-ds``: one command with a subcommand per job, each the ``main(argv)`` of the module that
``python -m sd_ds.X`` runs (so both forms take the same flags and print the same help).

    sd-ds --help                  the subcommands
    sd-ds SUBCOMMAND --help       its flags
    sd-ds init --preset tiny --output_dir ./model

Only the chosen subcommand's module is imported: ``sd-ds --help`` answers without importing torch.
"""

from __future__ import annotations

import difflib
import importlib
import textwrap
import sys
from typing import NamedTuple, Optional

from sd_ds import __version__
from sd_ds.lifecycle import run_to_exit


class Subcommand(NamedTuple):
    module: str  # its main(argv) is the subcommand
    summary: str  # one line in ``sd-ds --help``


SUBCOMMANDS: dict[str, Subcommand] = {
    "train": Subcommand("sd_ds.train",
                        "train the UNet with DeepSpeed ZeRO-2 (one rank; --help says how to launch many)"),
    "convert": Subcommand("sd_ds.convert.cli", "LAION base64 parts -> webdataset shards"),
    "init": Subcommand("sd_ds.init", "write a from-scratch model folder (--preset sd-v1, sd-v2, sdxl, tiny, tiny-sd2, tiny-sdxl)"),
    "encode-latents": Subcommand("sd_ds.encode_latents", "image shards -> latent shards, encoded once by the VAE"),
    "index": Subcommand("sd_ds.data.index", "index shard folders: sizes.json and a member index per shard"),
    "export": Subcommand("sd_ds.export", "a training checkpoint -> a diffusers folder"),
    "sample": Subcommand("sd_ds.sample", "images from prompts with an exported model"),
    "evaluate": Subcommand("sd_ds.evaluate", "FID and CLIP score (pip install 'sd-ds[eval]')"),
    "demo": Subcommand("sd_ds.demo", "the whole workflow on generated data, on CPU, in minutes"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"usage: sd-ds SUBCOMMAND [flags]   (sd-ds SUBCOMMAND --help for its flags)", "",
             "Pretrain Stable Diffusion from scratch with DeepSpeed ZeRO-2.", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {sub.summary}" for name, sub in SUBCOMMANDS.items()]
    lines += ["", "Each is also `python -m MODULE` with the same flags: "
              + ", ".join(sub.module.replace(".cli", "") for sub in SUBCOMMANDS.values()) + "."]
    return "\n".join(lines[:-1] + textwrap.wrap(lines[-1], 100))


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"sd-ds {__version__}")
        return 0
    name, rest = args[0], args[1:]
    # Underscores as the modules spell them (encode_latents) are accepted too.
    sub = SUBCOMMANDS.get(name) or SUBCOMMANDS.get(name.replace("_", "-"))
    if sub is None:
        close = difflib.get_close_matches(name, SUBCOMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; one of: {', '.join(SUBCOMMANDS)}"
        print(f"sd-ds: unknown subcommand '{name}'{hint} (sd-ds --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(sub.module)
    if sub.module == "sd_ds.convert.cli":
        return module.main(rest, prog="sd-ds convert")
    return module.main(rest) or 0


def entry() -> int:
    """The ``sd-ds`` console script: ``main()``, leaving as the subcommand's own ``python -m`` form does (a
    rank of ``sd-ds train`` without interpreter finalization: ``lifecycle.end_process``)."""
    return run_to_exit(main)


if __name__ == "__main__":
    sys.exit(entry())
