"""`safedig collect`: run a model over prompt files and record its activations into a store."""
from __future__ import annotations

import sys

from ..adapters.comfy.runner import runner_from_files
from ..formats.prompts import load_many
from ..formats.prompts import summary as prompt_summary
from ..formats.store import ActivationStore, summary
from ..pipeline import distributed
from ..pipeline.collect import collect
from . import args as A
from .common import StopFlag


def add_cli(sub) -> None:
    """Register `safedig collect` on the CLI's subparsers."""
    p = sub.add_parser("collect", help="record DiT activations of a model over prompt sets into an activation store",
                       description="Run a FLUX.1 or SD3/SD3.5 model (loaded through ComfyUI as a library, or a tiny "
                                   "random model with --tiny) over prompt files and record the chosen positions at "
                                   "the chosen sampler steps. Rerunning the same command resumes an interrupted run; "
                                   "Ctrl-C stops after the current prompt (twice: at once), the store stays valid.")
    p.add_argument("--prompts", nargs="+", required=True, metavar="FILE", help="CSV / TSV / JSONL / I2P CSV prompt files")
    p.add_argument("--out", required=True, metavar="DIR", type=A.output_dir, help="the store folder (created, or resumed)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="FILE", help="FLUX/SD3 diffusion model (.safetensors, as in ComfyUI's "
                                                     "models/diffusion_models); needs --clip")
    src.add_argument("--checkpoint", metavar="FILE", help="a checkpoint that includes its text encoders (e.g. SD3.5)")
    src.add_argument("--tiny", choices=("flux", "sd3"), help="a tiny random-weight model with stand-in text states "
                                                             "(derived from each prompt's text): for trying things out")
    p.add_argument("--clip", nargs="+", metavar="FILE", help="text encoders for --model: FLUX clip_l + t5xxl; "
                                                             "SD3 clip_l + clip_g + t5xxl")
    p.add_argument("--positions", default="all", help="'all' or a comma list, e.g. double.7.img,single.12.img")
    p.add_argument("--steps", type=A.integer(1, 10_000), help="sampler steps (default 28; 4 with --tiny)")
    p.add_argument("--record-steps", default="0.25,0.5,0.75",
                   help="steps to record: indices (0,5,-1), fractions of the schedule (0.25,0.5) or 'all'")
    p.add_argument("--token-budget", type=A.integer(0, 1 << 20), default=256,
                   help="token rows kept per image, position and recorded step (0: pooled means only)")
    p.add_argument("--seed", type=A.SEED, default=0, help="noise seed of prompt i is seed + i unless the file gives one")
    p.add_argument("--cfg", type=A.number(0.0, 100.0), help="CFG scale (default 1.0 for FLUX, 4.0 for SD3)")
    p.add_argument("--guidance", type=A.number(0.0, 100.0), default=3.5, help="FLUX guidance (FLUX.1 Dev)")
    p.add_argument("--negative", default="", help="negative prompt (used when cfg > 1)")
    # default None, not the name: argparse would run the check (and import ComfyUI) on a string default
    p.add_argument("--sampler", type=A.sampler, default=None, help="a ComfyUI sampler name (default euler)")
    p.add_argument("--scheduler", type=A.scheduler, default=None, help="a ComfyUI scheduler name (default simple)")
    p.add_argument("--width", type=A.integer(16, 8192), help="image width (default 1024; 64 with --tiny)")
    p.add_argument("--height", type=A.integer(16, 8192), help="image height (default 1024; 64 with --tiny)")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16", help="storage dtype of token rows")
    p.add_argument("--prompts-per-shard", type=A.integer(1, 1 << 20), help="default: shards of about 256 MiB")
    p.add_argument("--i2p-threshold", type=A.number(0.0, 100.0), default=50.0,
                   help="I2P files: percentage at which a categorised prompt counts as unsafe")
    p.set_defaults(run=run)


def run(args) -> None:
    from tqdm import tqdm

    prompts = load_many(args.prompts, args.i2p_threshold)
    print(prompt_summary(prompts), file=sys.stderr)
    runner = runner_from_files(args.tiny, args.model, args.checkpoint, args.clip, args.width, args.height,
                               args.cfg, args.guidance, args.negative, args.sampler or "euler",
                               args.scheduler or "simple")
    steps = args.steps or (4 if args.tiny else 28)
    ranks = distributed.from_env()
    bar = tqdm(total=len(prompts), unit="prompt", desc="collect" if ranks.world == 1 else f"collect [{ranks}]",
               dynamic_ncols=True, position=ranks.rank)

    def progress(done: int, total: int) -> None:
        bar.total = total  # this rank's prompts under torchrun
        bar.n = done
        bar.refresh()

    notice = ("safedig collect: stopping after this prompt (Ctrl-C again to stop at once; the store stays valid "
              "either way)")
    try:
        with StopFlag(lambda: tqdm.write(notice, file=sys.stderr)) as stop:
            result = collect(runner, prompts, args.positions, args.out, steps, args.record_steps, args.token_budget,
                             args.seed, progress=progress, should_stop=stop, dtype=args.dtype,
                             prompts_per_shard=args.prompts_per_shard, ranks=ranks)
    except KeyboardInterrupt:
        bar.close()
        print(f"safedig collect: the store at {args.out} is valid; run the same command again to resume",
              file=sys.stderr)
        raise
    finally:
        bar.close()
    if ranks.main:
        print(summary(ActivationStore(args.out)))
    if result.stopped:
        print(f"safedig collect: stopped; run the same command again to resume ({result})", file=sys.stderr)
        raise KeyboardInterrupt
