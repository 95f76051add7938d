"""Runs ../shared/peers/run_autoround.py unchanged but for one addition to its evaluation; started by
bench/learned.py with the peer venv's interpreter (AUTOROUND_PYTHON), arguments passed through.

Why: on a CPU with AVX512-BF16, auto-round 0.16 casts the model to bfloat16 for tuning (amp) and returns it in
bfloat16, and the script scores the model as returned, so its PPL_INMEM is a bfloat16-compute score of
bfloat16-rounded fake-quant weights, where the protocol scores in float32. This scores the returned model
cast to float32 (the same bfloat16 weights, float32 compute: `ppl_float32`, with `returned_dtype`, in the
script's result JSON). With AUTOROUND_SCORE_AS_RETURNED=1 it also scores it as returned (the script's own
`ppl_inmem`); otherwise `ppl_inmem` is the float32 score, which saves one 40-window eval (minutes) per row.
AUTOROUND_SEED=N passes seed=N to AutoRound in place of the script's 0 (its mini-batch order; the calibration
samples stay the script's), for a seed sweep beside llmc's `base.seed`.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers"
sys.path.insert(0, str(PEERS))
import common  # noqa: E402  (the peers' common.py, which run_autoround.py imports as the same module)

_eval_ppl, _write_json = common.eval_ppl, common.write_json
_extra: dict = {}


def eval_float32(model, ids, **kw):
    import torch

    dtype = next(model.parameters()).dtype
    _extra["returned_dtype"] = str(dtype)
    as_returned = os.environ.get("AUTOROUND_SCORE_AS_RETURNED") == "1" and dtype != torch.float32
    if as_returned:
        ppl, losses, seconds = _eval_ppl(model, ids, **kw)
    ppl32, losses32, seconds32 = _eval_ppl(model.to(torch.float32), ids, **kw)
    _extra.update(ppl_float32=ppl32, losses_float32=losses32, eval_float32_s=seconds32,
                  scored_as_returned=as_returned)
    print(f"PPL_FLOAT32 {ppl32:.4f} (returned dtype {_extra['returned_dtype']})", flush=True)
    return (ppl, losses, seconds) if as_returned else (ppl32, losses32, seconds32)


def write_with_float32(path, obj):
    _write_json(path, {**obj, **_extra})


common.eval_ppl, common.write_json = eval_float32, write_with_float32
if os.environ.get("AUTOROUND_SEED"):
    import auto_round

    _AutoRound, _seed = auto_round.AutoRound, int(os.environ["AUTOROUND_SEED"])

    def seeded(*args, **kwargs):
        _extra["seed"] = _seed
        return _AutoRound(*args, **{**kwargs, "seed": _seed})

    auto_round.AutoRound = seeded  # run_autoround.py imports the name from the module after this
sys.argv = [str(PEERS / "run_autoround.py"), *sys.argv[1:]]
runpy.run_path(str(PEERS / "run_autoround.py"), run_name="__main__")
