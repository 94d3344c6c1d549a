"""Command line: `vattn-ray generate` runs the offline engine on a prompt."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vattn-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("--model", default="builtin:tiny-llama",
                     help="Hugging Face checkpoint directory, or builtin:<name>")
    gen.add_argument("--prompt", action="append", required=True, help="may be repeated")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--tensor-parallel-size", type=int, default=1)
    gen.add_argument("--max-model-len", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from vattn_ray import LLM, SamplingParams

    llm = LLM(model=args.model, device=args.device, dtype=args.dtype,
              tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        for out in llm.generate(args.prompt, params):
            print(f"{out.prompt!r} -> {out.outputs[0].text!r} ({out.outputs[0].finish_reason})")
    finally:
        llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
