"""The ``cnkit`` command: one entry point for the kit's command lines.

Each subcommand hands its arguments, untouched, to the module whose parser it is (``cnkit train ...`` is
``python -m cnkit.training.train ...``), so a flag means the same under both and under ``accelerate launch -m cnkit
train ...``. Modules are imported only for the subcommand that runs, so ``cnkit --help`` answers at once.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module whose main() parses it, arguments put in front, one line of help)
COMMANDS = {
    "train": ("cnkit.training.train", [], "train a ControlNet or a successor (every TrainConfig field is a flag)"),
    "pretrain": ("cnkit.experiments.pretraining", [], "pretrain the embedded base (resumable; make pretrain)"),
    "init": ("cnkit.models.controlnets", ["init"], "write a zero-initialised ControlNet for a base (for diffusers' "
                                                  "own training script)"),
    "export": ("cnkit.models.export", [], "write a ControlNet in the original single-file layout (WebUI, ComfyUI)"),
    "sd15": ("cnkit.models.sd15", [], "write a random base of SD 1.5's exact shape (the GPU path, tested on a CPU)"),
    "runs": ("cnkit.experiments.configs", [], "train make figures' runs ahead of the notebooks, several at a time"),
    "forecast": ("cnkit.experiments.forecast", [], "the convergence forecast's rule on finished runs, beside their "
                                                  "validation"),
    "figures": ("cnkit.surfaces.report", [], "run every notebook at the full profile into a report (make figures)"),
    "controlnets": ("cnkit.experiments.shipped", [], "train and measure the shipped ControlNets (make controlnets)"),
    "architectures": ("cnkit.experiments.bench_runs", [], "train and ship notebook 10's successor runs "
                                                         "(make architectures)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: cnkit COMMAND [ARGS ...]   (cnkit COMMAND --help: that command's flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"cnkit: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, prefix, _ = COMMANDS[name]
    result = importlib.import_module(module).main(prefix + rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
