"""LLMC's `opencompass` section: after the run, ModelTC's OpenCompass build evaluates the saved transformed
model (`opencompass CFG -w OUTPUT --llmc_cfg CONFIG --llmc_eval_mode quant --llmc_model_path MODEL`, as
LLMC calls it). When the `opencompass` command is not installed the run goes on, says so at the start and
the end, and records the section as skipped in results.json."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Optional

from loguru import logger

from llmc.errors import ConfigError, UserError

MISSING = ("the opencompass command is not installed, so this section is skipped (install ModelTC's OpenCompass "
           "build, which takes the --llmc_* options, to run it)")


def installed() -> bool:
    return shutil.which("opencompass") is not None


def check(config) -> None:
    oc = config.opencompass
    if oc is None:
        return
    if not installed():
        logger.warning(f"opencompass: {MISSING}")
        return
    if not config.save.save_trans:
        raise ConfigError("opencompass", "evaluates the saved transformed model: set save.save_trans: True "
                          "(LLMC asserts the same)")
    if not Path(oc.cfg_path).is_file():
        raise ConfigError("opencompass.cfg_path", f"'{oc.cfg_path}' is not a file (an OpenCompass eval config)")


def run(config, config_path: Optional[str], out: Path) -> str:
    """Run OpenCompass on out/transformed_model; returns what results.json records."""
    oc = config.opencompass
    if not installed():
        logger.warning(f"opencompass: {MISSING}")
        return "skipped: opencompass is not installed"
    cmd = ["opencompass", oc.cfg_path, "-w", oc.output_path, "--max-num-workers", str(oc.max_num_workers),
           "--llmc_cfg", str(config_path), "--llmc_eval_mode", "quant",
           "--llmc_model_path", str((out / "transformed_model").resolve())]
    logger.info(f"opencompass: {' '.join(cmd)}")
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"opencompass failed: {' '.join(cmd)}")
    return f"ran; outputs in {oc.output_path}"
