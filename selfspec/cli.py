"""`selfspec` command line: one subcommand per stage, plus `run` for the whole pipeline.

Every command takes `--config NAME_OR_FILE` and `key=value` overrides. This module
imports neither torch nor ray: each command's implementation loads on demand, so
`selfspec --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

# command -> (implementation "module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("selfspec.stages.generate:cli", "generate domain instructions and responses from seeds"),
    "train": ("selfspec.stages.train:cli", "LoRA/QLoRA fine-tune the base on generated data (Ray Train)"),
    "eval": ("selfspec.stages.evaluate:cli", "evaluate the base and adapters on domain tasks"),
    "serve": ("selfspec.serving.app:cli", "serve the base and adapters behind an OpenAI-compatible API"),
    "run": ("selfspec.pipeline:cli", "run the whole pipeline: generate, train, evaluate"),
    "index": ("selfspec.stages.retrieve:cli_index", "build a retrieval index over a domain corpus"),
    "retrieve": ("selfspec.stages.retrieve:cli_retrieve", "query a retrieval index (for inspection)"),
    "export": ("selfspec.stages.train:cli_export", "export an adapter, optionally merged into the base"),
    "promote": ("selfspec.serving.registry:cli_promote", "register an adapter under a versioned name if it beats the base"),
    "inspect": ("selfspec.inspect_data:cli", "profile generated data against its seeds and show random rows"),
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default="default", help="config file or shipped config name (default: default)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. generate.target=40"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfspec",
        description="Self-Specialization: carve a domain expert out of a general LLM from a few seeds.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(command)
        if name == "generate":
            command.add_argument("--preview", type=int, metavar="N", help="generate N examples, show them and estimate the full run")
            command.add_argument("--overwrite", action="store_true", help="start over even if the run directory holds shards from another config")
        if name == "train":
            command.add_argument("--resume", action="store_true", help="resume from the run directory's latest checkpoint")
        if name == "eval":
            command.add_argument("--tasks", help="comma-separated task directories (or builtin:DOMAIN)")
            command.add_argument("--models", help="comma-separated: base and adapter directories")
            command.add_argument("--out", help="output directory (default: the run's eval/)")
        if name == "retrieve":
            command.add_argument("query", help="query text")
        if name == "export":
            command.add_argument("adapter", help="adapter directory")
            command.add_argument("--merge", action="store_true", help="write a merged full model")
            command.add_argument("--out", required=True, help="output directory")
        if name == "promote":
            command.add_argument("adapter", help="adapter directory with evaluation results")
            command.add_argument("--name", help="registered name (default: the adapter's domain)")
        if name == "inspect":
            command.add_argument("--rows", type=int, default=10, metavar="N", help="random rows to show (default: 10)")
            command.add_argument("--seed", type=int, default=0, help="seed for drawing the rows (default: 0)")
            command.add_argument("--task", metavar="TYPE", help="show only rows of this task type (the profile covers all rows)")
            command.add_argument("--file", metavar="PATH", help="a Parquet, Alpaca JSON/JSONL or chat JSONL file (default: the run's data/examples.parquet)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # argparse cannot tell overrides from the positional query/adapter after options.
    from selfspec.config import ConfigError, load_config
    from selfspec.models.resolve import ModelNotFoundError
    from selfspec.seeds import SeedError

    started = time.time()
    try:
        config = load_config(args.config, args.overrides)
        module_name, function_name = COMMANDS[args.command][0].split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        code = function(config, args)
    except (ConfigError, SeedError, ModelNotFoundError, FileNotFoundError) as exc:
        print(f"selfspec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"selfspec {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"selfspec {args.command}: done in {time.time() - started:.1f}s", file=sys.stderr)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
