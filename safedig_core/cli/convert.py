"""`safedig convert`: another library's SAE(s) to a SafeDIG dictionary file."""
from __future__ import annotations

from ..convert.converter import DTYPES, READERS, convert
from ..formats import dictionary
from . import args as A


def run(args) -> None:
    convert(args.format, args.src, args.family, args.position, args.out, args.harmful, args.k, DTYPES[args.dtype])
    print(dictionary.summary(dictionary.load(args.out), args.out))
    print(f"wrote {args.out}")


def add_cli(sub) -> None:
    """Register `safedig convert` on the CLI's subparsers."""
    p = sub.add_parser(
        "convert", help="turn an SAE from SAE-Lens, sparsify, dictionary_learning or OpenAI into a SafeDIG dictionary",
        description="Convert sparse autoencoders trained with another library into a SafeDIG safety dictionary "
                    "file. The converted SAEs encode exactly as in their source (per-token input normalisation "
                    "included); anything that cannot be represented exactly is refused with a one-line reason. "
                    ".pt files are read with weights_only=True: nothing in them is ever run.",
        epilog="sources: saelens = a folder with cfg.json + sae_weights.safetensors (or a folder of such folders); "
               "sparsify = a hookpoint folder with cfg.json + sae.safetensors (or the folder of hookpoints); "
               "dictionary_learning = ae.pt (its config.json beside it tells AutoEncoderTopK from BatchTopKSAE); "
               "openai = a state-dict .pt. "
               "Positions: with several SAEs in SRC, either give one --position NAME per SAE (in natural "
               "hookpoint order: layers.2 before layers.10) or pick them with --position HOOK=NAME. "
               "Example: safedig convert --format sparsify sae-dir --family flux --position layers.7=double.7.img "
               "--position layers.20=single.1.img --harmful double.7.img:12,873 --out models/sae/converted.safetensors")
    p.add_argument("--format", required=True, choices=list(READERS), help="the library SRC was saved by")
    p.add_argument("src", metavar="SRC", help="the source file or folder")
    p.add_argument("--family", required=True, choices=("flux", "sd3"), help="the model family the SAEs were trained on")
    p.add_argument("--position", action="append", required=True, metavar="[HOOK=]NAME",
                   help="SafeDIG position the SAE reads, e.g. double.7.img; repeat for several SAEs")
    p.add_argument("--out", required=True, metavar="FILE", type=A.output_file, help="the dictionary file to write (.safetensors)")
    p.add_argument("--harmful", action="append", default=[], metavar="[NAME:]LATENTS",
                   help="harmful latent indices, e.g. 12,873,4051 (one position) or double.7.img:12,873 (repeatable); "
                        "none given: a dictionary that steers nothing until latents are selected "
                        "(SafeDIG Select Features node)")
    p.add_argument("--k", type=A.integer(1, 1 << 22), default=None, metavar="K",
                   help="per-token TopK with this k: needed for a dictionary_learning TopK file without its "
                        "config.json; for other TopK SAEs it replaces the source's k")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="tensor precision in the file")
    p.set_defaults(run=run)
