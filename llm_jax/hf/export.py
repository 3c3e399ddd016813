"""`python -m llm_jax.hf export`: a stage of a run directory as a Hugging Face
directory (its final checkpoint, or --step's), with the run's tokenizer.

    python -m llm_jax.hf export --workdir runs/x --stage sft --out hf_out

Prints one JSON line {"out", "family"}. A mistake the user can fix (no such
stage, a reward model's params, a model no family fits, an --out that cannot be
written) is `error: ...` and exit status 2, through `llm_jax.cli.run`.
"""

from __future__ import annotations

import argparse
import json

from llm_jax.errors import HFError
from llm_jax.generate import load_stage
from llm_jax.hf.pretrained import save_pretrained


def export_stage(workdir: str, stage: str, out: str, step: int | None = None) -> str:
    """Writes the LM of `workdir/stage` (its final checkpoint, or `step`'s) as a HF
    directory `out`, with the run's tokenizer. Returns the family written."""
    cfg, params, tok, _ = load_stage(workdir, stage, step, decoder_only=False)
    return save_pretrained(out, cfg, params, tokenizer=tok)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llm_jax.hf",
        description="Hugging Face interop: import and export GPT-2, Llama-family and BERT checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a run's stage as a Hugging Face directory")
    ex.add_argument("--workdir", required=True)
    ex.add_argument("--stage", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--step", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        family = export_stage(args.workdir, args.stage, args.out, args.step)
    except OSError as e:
        # --out is a file, unwritable, or the disk is full: name the flag, which cli.run cannot.
        raise HFError(f"--out {args.out}: {e.strerror}: {e.filename or args.out}") from None
    print(json.dumps({"out": args.out, "family": family}))
    return 0
