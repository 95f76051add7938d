"""Command line: python -m llmc --config X.yml [--set key=value ...] [--device cpu|cuda]."""
from __future__ import annotations

import argparse
import sys

from loguru import logger

from llmc.engine import distributed
from llmc.errors import UserError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmc", description="Post-training quantization of LLMs from one YAML config.")
    p.add_argument("--config", required=True, help="YAML config (LLMC schema)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set quant.weight.bit=3 (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--results", default=None, help="write results.json here instead of the output folder")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty save_path")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint in save_path/.llmc_resume")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, read only the model's config, print the plan and exit (no weights loaded)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from llmc.config import load_config
        from llmc.run import run

        config = load_config(args.config, args.set)
        if args.dry_run:
            from llmc.plan import plan
            from llmc.run import ignored_names

            print(plan(config, ignored_names))
            return 0
        try:
            run(config, device=args.device, config_path=args.config, results_path=args.results,
                overwrite=args.overwrite, resume=args.resume)
        finally:
            distributed.finish()
    except UserError as err:
        logger.remove()
        print(f"llmc: error: {err}", file=sys.stderr)
        return 2
    return 0
