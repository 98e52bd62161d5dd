"""Streamed-merge benchmark: throughput and peak memory of ``nograd.merge("frank", ...)`` on tiny-but-wide models.

Builds a homologous trio from configs (a Qwen2 base, a reasoning copy, a Qwen2.5-VL whose language model is a copy of
the base; few layers, wide tensors; random weights, bf16 by default), saves them as safetensors, then runs the
streamed merge in a fresh child process and reports:

- ``seconds``: wall time of the merge call (statistics pass + write pass for ``rule="frank"``);
- ``read_GBps``/``write_GBps``: bytes of checkpoint read / written per second (read counts every tensor of every
  model the rule touches, once per pass);
- ``peak_rss_MB``: the child's peak resident set (``VmHWM``) minus its RSS just before the call; it includes pages of
  the memory-mapped input shards the reader touched (file-backed, reclaimable);
- ``peak_anon_MB``: peak anonymous memory (``RssAnon``, sampled every 2 ms) minus the value before the call: the
  merge's own buffers, to compare with ``largest_tensor_MB`` (the design target is about 3x the largest tensor in
  fp32, i.e. 6x its bf16 size).

    python bench/merge.py                                  # defaults: hidden 2048, intermediate 8192, 4 layers, bf16
    python bench/merge.py --hidden 1024 --layers 2 --rule linear
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(args, folder: Path) -> dict:
    import torch
    import transformers as tf

    dtype = getattr(torch, args.dtype)
    text = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = tf.Qwen2ForCausalLM._from_config(tf.Qwen2Config(**text), dtype=dtype)
    base.save_pretrained(folder / "base")
    with torch.no_grad():
        for p in base.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    base.save_pretrained(folder / "reasoning")
    del base
    config = tf.Qwen2_5_VLConfig(
        text_config=dict(text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           hidden_size=64, intermediate_size=128, out_hidden_size=args.hidden, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=args.vocab - 4, video_token_id=args.vocab - 3, vision_start_token_id=args.vocab - 2,
        vision_end_token_id=args.vocab - 1)
    mllm = tf.Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    mllm.save_pretrained(folder / "mllm", max_shard_size=args.shard)
    largest = max(p.numel() * p.element_size() for p in mllm.parameters())
    sizes = {name: sum(f.stat().st_size for f in (folder / name).glob("*.safetensors"))
             for name in ("mllm", "reasoning", "base")}
    return {"largest_tensor_MB": largest / 1e6, "checkpoint_MB": {k: v / 1e6 for k, v in sizes.items()}}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(args) -> None:
    """Run one merge in this (fresh) process and print one JSON line."""
    import nograd  # noqa: F401  (imports done before the baseline)

    folder = Path(args.folder)
    peak = {"anon": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], _status("RssAnon"))
            time.sleep(0.002)

    base_rss, base_anon = _status("VmRSS"), _status("RssAnon")
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    report = nograd.merge("frank", mllm=folder / "mllm", reasoning=folder / "reasoning", base=folder / "base",
                          out=folder / "out", rule=args.rule,
                          **{"frank": {"prior": "exp"}, "linear": {"lambda_r": 0.5}}.get(args.rule, {}))
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    print(json.dumps({"seconds": seconds, "bytes_written": report["bytes"], "files": len(report["files"]),
                      "layers_merged": report["layers"], "peak_rss_MB": (_status("VmHWM") - base_rss) / 1e6,
                      "peak_anon_MB": (max(peak["anon"], _status("RssAnon")) - base_anon) / 1e6}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--shard", default="200MB", help="max_shard_size of the saved MLLM")
    parser.add_argument("--rule", default="frank", choices=("frank", "linear", "task_arithmetic", "ties"))
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="nograd-bench-merge-") as tmp:
        folder = Path(tmp)
        info = build(args, folder)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
        command = [sys.executable, __file__, "--child", "--folder", str(folder), "--rule", args.rule]
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    mb = info["checkpoint_MB"]
    passes = {"frank": (mb["mllm"] + mb["reasoning"] + mb["base"]) + (mb["mllm"] + mb["reasoning"]),
              "linear": mb["mllm"] + mb["reasoning"],
              "task_arithmetic": mb["mllm"] * 2 + mb["reasoning"] * 2 + mb["base"] * 2,
              "ties": mb["mllm"] * 2 + mb["reasoning"] * 2 + mb["base"] * 2}[args.rule]
    result.update(info, rule=args.rule, dtype=args.dtype, hidden=args.hidden, intermediate=args.intermediate,
                  layers=args.layers, vocab=args.vocab,
                  read_GBps=passes / 1e3 / result["seconds"],
                  write_GBps=result["bytes_written"] / 1e9 / result["seconds"],
                  peak_anon_over_largest_tensor=result["peak_anon_MB"] / info["largest_tensor_MB"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
