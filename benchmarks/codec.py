"""Codec benchmark: encode/decode throughput, compression ratio and weight error on a state dict.

    .venv/bin/python benchmarks/codec.py                 # 25M params, normal(0, 0.02) weights
    .venv/bin/python benchmarks/codec.py --quick         # a small state dict, a couple of seconds
    .venv/bin/python benchmarks/codec.py --init uniform  # uniform weights: what zstd cannot squeeze
    .venv/bin/python benchmarks/codec.py --model lm      # an initialised model of the LM task, if present

Throughput is MB/s of fp32 input (1 MB = 1e6 bytes), best of --repeat runs: the machine may be shared,
so the best run is the one least disturbed by other processes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable

import torch

from p2pcod import codec


def transformer_state_dict(params: int, init: str = "normal", seed: int = 0) -> dict[str, torch.Tensor]:
    """GPT-like shapes (byte vocab, learned positions, pre-LN blocks) with about `params` parameters."""
    g = torch.Generator().manual_seed(seed)
    width = 512 if params >= 8_000_000 else 256 if params >= 1_000_000 else 64
    vocab, context = 256, 1024
    layers = max(1, round((params - (vocab + context) * width) / (12 * width * width)))

    def weight(*shape: int) -> torch.Tensor:
        if init == "uniform":  # same std as normal(0, 0.02)
            return (torch.rand(*shape, generator=g) * 2 - 1) * (0.02 * math.sqrt(3))
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"wte.weight": weight(vocab, width), "wpe.weight": weight(context, width)}
    for i in range(layers):
        p = f"h.{i}."
        sd[p + "ln_1.weight"] = 1 + 0.1 * torch.randn(width, generator=g)
        sd[p + "ln_1.bias"] = 0.01 * torch.randn(width, generator=g)
        sd[p + "attn.c_attn.weight"] = weight(3 * width, width)
        sd[p + "attn.c_attn.bias"] = 0.01 * torch.randn(3 * width, generator=g)
        sd[p + "attn.c_proj.weight"] = weight(width, width)
        sd[p + "attn.c_proj.bias"] = 0.01 * torch.randn(width, generator=g)
        sd[p + "ln_2.weight"] = 1 + 0.1 * torch.randn(width, generator=g)
        sd[p + "ln_2.bias"] = 0.01 * torch.randn(width, generator=g)
        sd[p + "mlp.c_fc.weight"] = weight(4 * width, width)
        sd[p + "mlp.c_fc.bias"] = 0.01 * torch.randn(4 * width, generator=g)
        sd[p + "mlp.c_proj.weight"] = weight(width, 4 * width)
        sd[p + "mlp.c_proj.bias"] = 0.01 * torch.randn(width, generator=g)
    sd["ln_f.weight"] = torch.ones(width)
    sd["ln_f.bias"] = torch.zeros(width)
    return sd


def lm_state_dict(params: int) -> dict[str, torch.Tensor] | None:
    """Hook for a real model of the LM task: None (with a message) where p2pcod.tasks lacks it."""
    try:
        from p2pcod.tasks import get_task
    except ImportError as err:
        print(f"--model lm skipped: p2pcod.tasks is not available ({err})", file=sys.stderr)
        return None
    width = 512 if params >= 8_000_000 else 256 if params >= 1_000_000 else 64
    layers = max(1, round(params / (12 * width * width)))
    torch.manual_seed(0)
    model = get_task({"name": "lm"}).build_model(
        {"layers": layers, "width": width, "heads": max(1, width // 64), "context": 256})
    return {k: v.detach() for k, v in model.state_dict().items()}


def trained_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The model weights of a local checkpoint (of one peer, or model 0 of an in-process group)."""
    from p2pcod import checkpoint

    state = checkpoint.load(path)
    return state["models"][0]["model"] if "models" in state else state["model"]


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def measure(sd: dict[str, torch.Tensor], options: codec.CodecOptions, repeat: int) -> dict:
    fp32_bytes = sum(t.numel() * 4 for t in sd.values() if t.is_floating_point())
    t_enc, blob = best_of(lambda: codec.encode(sd, {"bench": True}, options), repeat)
    t_dec, (out, _) = best_of(lambda: codec.decode(blob), repeat)  # type: ignore[misc]
    num = sum(float((sd[k].double() - out[k].double()).pow(2).sum()) for k in sd if sd[k].is_floating_point())
    den = sum(float(sd[k].double().pow(2).sum()) for k in sd if sd[k].is_floating_point())
    return {
        "params": sum(t.numel() for t in sd.values()), "tensors": len(sd), "fp32_mb": fp32_bytes / 1e6,
        "blob_mb": len(blob) / 1e6, "ratio": fp32_bytes / len(blob),
        "encode_mb_s": fp32_bytes / 1e6 / t_enc, "decode_mb_s": fp32_bytes / 1e6 / t_dec,
        "encode_s": t_enc, "decode_s": t_dec, "rel_error": math.sqrt(num / den),
        "block": options.block, "level": options.level, "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small state dict (~1M params), 2 repeats")
    ap.add_argument("--params", type=int, default=25_000_000, help="approximate parameter count")
    ap.add_argument("--init", choices=["normal", "uniform"], default="normal", help="weight distribution")
    ap.add_argument("--model", choices=["synthetic", "lm"], default="synthetic",
                    help="synthetic transformer shapes, or an initialised LM-task model (p2pcod.tasks)")
    ap.add_argument("--checkpoint", default=None,
                    help="measure a trained model instead: a local checkpoint.ckpt of `p2pcod train` or `p2pcod peer`")
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--threads", type=int, default=-1, help="zstd worker threads (-1: all cores)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    params, repeat = (1_000_000, min(args.repeat, 2)) if args.quick else (args.params, args.repeat)

    if args.checkpoint:
        sd = trained_state_dict(args.checkpoint)
        args.model, args.init = f"trained {args.checkpoint}", "trained"
    elif args.model == "lm":
        sd = lm_state_dict(params)
        if sd is None:
            return 0
    else:
        sd = transformer_state_dict(params, args.init)
    options = codec.CodecOptions(block=args.block, level=args.level, threads=args.threads)
    r = {"model": args.model, "init": args.init, **measure(sd, options, repeat), "repeat": repeat}
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['params']:,} params in {r['tensors']} tensors ({r['model']}, {r['init']} init), "
              f"block {r['block']}, zstd level {r['level']}, best of {repeat}")
        print(f"  encode  {r['encode_mb_s']:8.0f} MB/s of fp32  ({r['encode_s'] * 1e3:.1f} ms)")
        print(f"  decode  {r['decode_mb_s']:8.0f} MB/s of fp32  ({r['decode_s'] * 1e3:.1f} ms)")
        print(f"  ratio   {r['ratio']:8.3f} x vs fp32  ({r['fp32_mb']:.1f} MB -> {r['blob_mb']:.2f} MB)")
        print(f"  error   {r['rel_error']:8.5f} relative L2 (||x - x'|| / ||x||)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
