"""The `ettin-jax` command line. Nothing imports this module; it imports the rest."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence

DTYPES = ("float32", "bfloat16")
# Files besides the weights that make a directory usable on its own (tokenizer, generation).
_COMPANIONS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "generation_config.json", "chat_template.jinja",
)  # fmt: skip


class CommandError(Exception):
    """A user error the command reports in one line."""


def _convert(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ettin_jax.convert import checkpoint_format, load_pretrained, model_class, resolve, save_pretrained
    from ettin_jax.convert.checkpoint import make_staging_dir

    dst = os.path.abspath(args.dst)
    if os.path.exists(dst) and not args.overwrite:
        raise CommandError(f"{dst} already exists; pass --overwrite to replace it")
    src = resolve(args.src, args.revision)
    source_format = checkpoint_format(src)
    target = args.to or ("transformers" if source_format == "flax" else "flax")
    dtype = jnp.dtype(args.dtype)
    cls = model_class(src)
    print(f"reading {src} ({source_format}) as {cls.__name__}", file=sys.stderr)
    model = load_pretrained(cls, src, dtype=dtype, param_dtype=dtype, legacy_rope=args.legacy_rope, progress=True)

    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    staging = make_staging_dir(parent, f".{os.path.basename(dst)}.tmp-")
    try:
        save_pretrained(model, staging, format=target)
        for name in _COMPANIONS:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(staging, name))
        # Verify before anything is renamed into place: the written files must load back to
        # exactly the params we hold.
        reloaded = load_pretrained(cls, staging, dtype=dtype, param_dtype=dtype)
        ours = jax.tree.leaves(nnx.state(model, nnx.Param))
        theirs = jax.tree.leaves(nnx.state(reloaded, nnx.Param))
        if len(ours) != len(theirs) or not all(
            np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, theirs, strict=True)
        ):
            raise CommandError(f"verification failed: {staging} does not reload to the converted params")
        if os.path.exists(dst):
            old = make_staging_dir(parent, f".{os.path.basename(dst)}.old-")
            os.replace(dst, os.path.join(old, "previous"))
            os.replace(staging, dst)
            shutil.rmtree(old)
        else:
            os.replace(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    c = model.config
    print(
        f"wrote {dst} ({target})\n"
        f"  class       {cls.__name__}\n"
        f"  parameters  {model.num_parameters():,}\n"
        f"  dtype       {dtype.name}\n"
        f"  layers      {c.num_hidden_layers} ({c.layer_types.count('full_attention')} global, "
        f"{c.layer_types.count('sliding_attention')} sliding)\n"
        f"  window      {c.sliding_window} keys on sliding layers\n"
        f"  verified    reloads to identical params"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ettin-jax", description="ModernBERT Decoder (Ettin) in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint between transformers and flax formats",
        description="Convert SRC (a directory or a Hub repo id) into DST. The default target is flax for a "
        "transformers checkpoint and transformers for a flax one.",
    )
    convert.add_argument("src", help="a transformers or ettin-jax directory, or a Hub repo id")
    convert.add_argument("dst", help="the directory to write (written atomically)")
    convert.add_argument("--to", choices=("flax", "transformers"), help="the target format")
    convert.add_argument("--dtype", choices=DTYPES, default="float32", help="param dtype to write")
    convert.add_argument("--revision", help="a Hub revision (branch, tag or commit)")
    convert.add_argument(
        "--legacy-rope",
        action="store_true",
        help="use the global RoPE theta on every layer, as transformers 4.54-4.57 did",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ettin_jax.config import ConfigError
    from ettin_jax.convert import CheckpointError, CheckpointFormatError

    try:
        return args.run(args)
    except (CommandError, ConfigError, CheckpointError, CheckpointFormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
