"""The `ettin-jax` command line: `convert`, `generate`, `run`, `serve`, `eval`, `perplexity` and
`train classify|lm`. Nothing imports this module; it imports the rest."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import socket
import sys
import traceback
import typing
import warnings
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ettin_jax.train
from ettin_jax import compile_cache, distributed, evaluation, files, jobs, modeling, scoring, server, sharding
from ettin_jax.convert import architecture, checkpoint_format, load_pretrained, resolve, save_pretrained
from ettin_jax.errors import EttinError
from ettin_jax.pipelines import pipeline
from ettin_jax.quantization import KV_CACHE_DTYPES, QUANTIZATIONS

DTYPES = ("float32", "bfloat16")
DEFAULT_MODEL_NAME = "ettin-jax-default"  # what `serve` calls the embedded default model
# Files besides the weights that make a directory usable on its own (tokenizer, generation).
_COMPANIONS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "generation_config.json", "chat_template.jinja",
)  # fmt: skip


class CommandError(EttinError):
    """A user error the command reports in one line."""


# ---- checks of the arguments, made before any work ----------------------------------------
def _at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    """Each integer flag in `names` (dests) that was given is >= `minimum`."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise CommandError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def _finite(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not math.isfinite(value):
            raise CommandError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def _read_text(flag: str, path: str) -> str:
    """The UTF-8 text of the file a flag names; a one-line error naming both otherwise."""
    try:
        return files.read_text(path)
    except OSError as e:
        raise CommandError(f"{flag} {path}: {e.strerror or e}") from None
    except files.NotTextError as e:
        raise CommandError(f"{flag} {e}") from None


def _stdin_lines() -> Iterator[str]:
    """stdin's lines without their ends, as they come; one that is not UTF-8 is an error naming it."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream with no bytes beneath (a program that embeds main())
        for line in sys.stdin:
            yield line.rstrip("\r\n")
        return
    for number, raw in enumerate(stream, 1):
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise CommandError(f"stdin line {number}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check_mesh(args: argparse.Namespace) -> None:
    if getattr(args, "mesh", None) is not None:
        sharding.parse_mesh(args.mesh)  # its syntax; the sizes are checked against the devices later


def _mesh(args: argparse.Namespace) -> typing.Any:
    """The mesh --mesh asks for, or None; an error names the flag."""
    try:
        return sharding.mesh_from_arg(args.mesh)
    except EttinError as e:
        if str(e).startswith("--mesh"):
            raise
        raise CommandError(f"--mesh {args.mesh}: {e}") from None


def _check_sampling(args: argparse.Namespace) -> None:
    """The flags of `generate` and `run` that say how to sample, before the model loads."""
    _at_least(args, 0, "max_new_tokens", "top_k")
    _at_least(args, 1, "max_batch_size", "num_return_sequences")
    _finite(args, "temperature", "top_p", "min_p", "repetition_penalty")
    if getattr(args, "seed", None) is not None and not 0 <= args.seed < 2**32:
        raise CommandError(f"--seed must be in [0, 2**32), got {args.seed}")
    if getattr(args, "do_sample", False) and not args.temperature > 0:
        raise CommandError(f"--temperature must be > 0 with --do-sample, got {args.temperature}")
    if getattr(args, "top_p", None) is not None and not 0.0 < args.top_p <= 1.0:
        raise CommandError(f"--top-p must be in (0, 1], got {args.top_p}")
    if getattr(args, "min_p", None) is not None and not 0.0 <= args.min_p <= 1.0:
        raise CommandError(f"--min-p must be in [0, 1], got {args.min_p}")
    if getattr(args, "repetition_penalty", None) is not None and not args.repetition_penalty > 0:
        raise CommandError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if getattr(args, "num_return_sequences", 1) > 1 and not args.do_sample:
        raise CommandError(
            f"--num-return-sequences {args.num_return_sequences} needs --do-sample (greedy decoding would return "
            "identical copies)"
        )


def _check_generate(args: argparse.Namespace) -> None:
    if args.output_file and not args.input_file:
        raise CommandError("--output-file needs --input-file")
    if args.resume and not args.output_file:
        raise CommandError("--resume needs --output-file")
    _check_sampling(args)
    _check_mesh(args)
    if args.output_file and (jobs.same_file(args.input_file, args.output_file) or os.path.isdir(args.output_file)):
        # The input itself (however spelt) or a directory, refused here; the checks that the
        # processes make together (an existing output, --resume) come in jobs.plan.
        jobs.check_paths(args.input_file, args.output_file)


def _check_run(args: argparse.Namespace) -> None:
    _check_sampling(args)


def _check_serve(args: argparse.Namespace) -> None:
    _at_least(args, 1, "max_batch_size", "max_length", "max_n", "max_tokens", "max_body_bytes")
    _at_least(args, 0, "max_logprobs")
    _finite(args, "shutdown_timeout")
    if args.shutdown_timeout < 0:
        raise CommandError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port must be in [0, 65535], got {args.port}")
    _check_mesh(args)
    args.chat_template_text = _read_text("--chat-template", args.chat_template) if args.chat_template else None
    _check_listen(args.host, args.port)


def _check_listen(host: str, port: int) -> None:
    """That the server can listen on host:port, found before the model loads rather than after."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise CommandError(f"--host {host!r} is not an address this machine can listen on ({e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            raise CommandError(f"cannot listen on {host}:{port} (--host, --port): {e.strerror or e}") from None


def _check_convert(args: argparse.Namespace) -> None:
    if os.path.exists(args.src):  # a Hub id is checked once it is downloaded
        _check_apart(args.src, args.dst)


def _check_apart(src: str, dst: str) -> None:
    """DST is neither SRC nor inside it, nor SRC inside DST: writing DST (and with --overwrite,
    deleting what was there) never touches the source, however the paths are spelt."""
    source, target = os.path.realpath(src), os.path.realpath(dst)
    if source == target or jobs.same_file(src, dst):
        raise CommandError(f"DST {dst} is the source {src}: converting in place would replace what it reads")
    common = os.path.commonpath([source, target])
    if common == source:
        raise CommandError(f"DST {dst} is inside the source {src}; write the conversion somewhere else")
    if common == target:
        raise CommandError(
            f"the source {src} is inside DST {dst}, which converting (with --overwrite) would delete; "
            "write the conversion somewhere else"
        )


# ---- convert ------------------------------------------------------------------------------
def _convert(args: argparse.Namespace) -> int:
    dst = os.path.abspath(args.dst)
    _check_convert(args)
    if os.path.exists(dst) and not args.overwrite:
        raise CommandError(f"{dst} already exists; pass --overwrite to replace it")
    src = resolve(args.src, args.revision)
    _check_apart(src, dst)
    source_format = checkpoint_format(src)
    target = args.to or ("transformers" if source_format == "flax" and not args.quantize else "flax")
    dtype = jnp.dtype(args.dtype)
    cls = getattr(modeling, architecture(src))
    print(f"reading {src} ({source_format}) as {cls.__name__}", file=sys.stderr)
    if args.quantize and target != "flax":
        raise CommandError("--quantize writes an ettin-jax flax checkpoint; transformers cannot read int8 weights")
    model = load_pretrained(
        cls, src, dtype=dtype, param_dtype=dtype, legacy_rope=args.legacy_rope, progress=True,
        allow_nonfinite=args.allow_nonfinite, **({"quantization": args.quantize} if args.quantize else {}),
    )  # fmt: skip

    staging = files.staging_dir_for(dst)
    try:
        save_pretrained(model, staging, format=target)
        for name in _COMPANIONS:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(staging, name))
        # Verify before anything is renamed into place: the written files must load back to
        # exactly the params we hold.
        with warnings.catch_warnings():  # NaN or inf let in by --allow-nonfinite were reported on reading
            warnings.simplefilter("ignore", UserWarning)
            reloaded = load_pretrained(
                cls, staging, dtype=dtype, param_dtype=dtype, allow_nonfinite=args.allow_nonfinite
            )
        ours = jax.tree.leaves(nnx.state(model, nnx.Param))
        theirs = jax.tree.leaves(nnx.state(reloaded, nnx.Param))
        if len(ours) != len(theirs) or not all(
            np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True) for a, b in zip(ours, theirs, strict=True)
        ):
            raise CommandError(f"verification failed: {staging} does not reload to the converted params")
        files.publish(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    c = model.config
    print(
        f"wrote {dst} ({target})\n"
        f"  class       {cls.__name__}\n"
        f"  parameters  {model.num_parameters():,}\n"
        f"  dtype       {dtype.name}{' (weights int8)' if c.quantization else ''}\n"
        f"  layers      {c.num_hidden_layers} ({c.layer_types.count('full_attention')} global, "
        f"{c.layer_types.count('sliding_attention')} sliding)\n"
        f"  window      {c.sliding_window} keys on sliding layers\n"
        f"  verified    reloads to identical params"
    )
    return 0


# ---- generate and run ---------------------------------------------------------------------
def _model_kwargs(args: argparse.Namespace) -> dict:
    """from_pretrained's arguments that --dtype, --quantize and --kv-cache-dtype ask for (a
    flag not given leaves what the checkpoint records)."""
    kwargs = {"dtype": args.dtype}
    if args.allow_nonfinite:
        kwargs["allow_nonfinite"] = True
    if args.quantize:
        kwargs["quantization"] = args.quantize
    if getattr(args, "kv_cache_dtype", None):
        kwargs["kv_cache_dtype"] = args.kv_cache_dtype
    return kwargs


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        num_return_sequences=args.num_return_sequences, seed=args.seed, stop_strings=args.stop or None,
    )  # fmt: skip


def _print_result(record: dict) -> None:
    if "error" in record:
        print(f"error: prompt {record['prompt']!r}: {record['error']}", file=sys.stderr)
        return
    texts = record["generated_text"]
    for text in texts if isinstance(texts, list) else [texts]:
        print(text)
    sys.stdout.flush()


def _generate(args: argparse.Namespace) -> int:
    _check_generate(args)  # main() did; again for callers of this function
    mesh = _mesh(args)
    primary = distributed.is_primary()
    kwargs = _sampling_kwargs(args)
    if args.input_file:
        try:
            prompts = jobs.read_prompts(args.input_file)
        except OSError as e:
            raise CommandError(f"--input-file {args.input_file}: {e.strerror or e}") from None
    else:
        prompts = args.prompt or [line for line in _stdin_lines() if line.strip()]
        if not prompts:
            raise CommandError("no prompt: pass PROMPT arguments, --input-file, or lines on stdin")
    if not args.input_file and len(prompts) == 1 and args.num_return_sequences == 1:
        # One prompt at a terminal: show tokens as they are made.
        generator = pipeline("text-generation", model=args.model, mesh=mesh, **_model_kwargs(args))
        out = sys.stdout if primary else io.StringIO()
        out.write(prompts[0])
        for piece in generator.stream(prompts[0], **kwargs):
            out.write(piece)
            out.flush()
        out.write("\n")
        return 0
    # Checked before the model loads. Without a mesh, several processes share a file's prompts
    # (each its own replica of the model); with one, every process runs every request on it.
    job = jobs.plan(prompts, args.input_file, args.output_file, resume=args.resume, share=mesh is None)
    if job.finished:
        if primary:
            print(f"{args.output_file} already holds the results of all {len(prompts)} prompts", file=sys.stderr)
        return 0
    if job.done and job.path is not None:
        print(f"resuming {job.path}: {job.done} of {len(job.indices)} results are there", file=sys.stderr)
    generator = pipeline("text-generation", model=args.model, mesh=mesh, **_model_kwargs(args))
    summary = jobs.run(
        generator, prompts, job, max_batch_size=args.max_batch_size, progress=primary and bool(args.input_file),
        echo=_print_result if primary and not args.output_file else None, **kwargs,
    )  # fmt: skip
    if summary.preempted:
        print(
            f"stopped by SIGTERM after {summary.prompts} more results; run again with --resume to finish",
            file=sys.stderr,
        )
        return ettin_jax.train.PREEMPTED_EXIT
    if summary.prompts and (primary or job.merge):
        who = f"process {jax.process_index()}: " if job.merge else ""
        failed = f"; {summary.failed} failed (their lines hold the error)" if summary.failed else ""
        print(
            f"{who}{summary.prompts} prompts, {summary.tokens} new tokens in {summary.seconds:.1f} s: "
            f"{summary.tokens / summary.seconds:.1f} tokens/s{failed}",
            file=sys.stderr,
        )
    if summary.written:
        print(f"wrote {summary.written} results to {args.output_file}", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    pipe = pipeline(args.task, model=args.model, **_model_kwargs(args))
    for text in _stdin_lines():
        if not text.strip():
            continue
        if args.task == "text-generation":
            print(pipe(text, max_new_tokens=args.max_new_tokens)[0]["generated_text"])
        else:
            print(json.dumps(pipe(text)[0]))
        sys.stdout.flush()
    return 0


# ---- serve --------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    if not hasattr(args, "chat_template_text"):
        _check_serve(args)  # main() did; again for callers of this function
    template = args.chat_template_text
    config = server.ServerConfig(
        model_name=args.served_model_name or args.model or DEFAULT_MODEL_NAME,
        api_key=args.api_key or os.environ.get(server.API_KEY_ENV) or None,
        max_tokens=args.max_tokens, max_n=args.max_n, max_logprobs=args.max_logprobs,
        max_body_bytes=args.max_body_bytes, chat_template=template,
    )  # fmt: skip
    generator = pipeline("text-generation", model=args.model, mesh=_mesh(args), **_model_kwargs(args))
    server.serve(
        generator, config, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout,
        max_batch_size=args.max_batch_size, max_length=args.max_length,
    )  # fmt: skip
    return 0


# ---- eval and perplexity ------------------------------------------------------------------
def _check_eval(args: argparse.Namespace) -> None:
    _at_least(args, 0, "num_fewshot")
    _at_least(args, 1, "batch_size", "max_length", "max_gen_toks")
    if args.limit is not None and not (math.isfinite(args.limit) and args.limit > 0):
        raise CommandError(f"--limit must be > 0 (a count, or a fraction below 1), got {args.limit}")
    args.task_list = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.task_list:
        raise CommandError(f"--tasks names no task: {args.tasks!r}")
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise CommandError(f"--include-path {args.include_path}: not a directory")
    if args.max_length is not None and args.max_gen_toks >= args.max_length:
        raise CommandError(
            f"--max-gen-toks {args.max_gen_toks} leaves no room for a prompt in --max-length {args.max_length}"
        )
    if args.log_samples and not args.output_path:
        raise CommandError("--log-samples needs --output-path")
    if args.output_path:
        if os.path.exists(args.output_path):
            raise CommandError(f"--output-path {args.output_path} exists; ettin-jax never overwrites a result")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output_path))):
            raise CommandError(f"--output-path {args.output_path}: its directory does not exist")


def _samples_path(output_path: str, task: str) -> str:
    """Where --log-samples writes a task's samples: beside the results, as lm-eval names them."""
    stem = output_path[: -len(".json")] if output_path.endswith(".json") else output_path
    return f"{stem}_samples_{task}.jsonl"


def _eval(args: argparse.Namespace) -> int:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable, make_table

        from ettin_jax import harness
    except ImportError as e:
        raise CommandError(f'ettin-jax eval needs lm-evaluation-harness: pip install "ettin-jax[eval]" ({e})') from None
    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in args.task_list if not manager.match_tasks([t])]
    if unknown:
        where = f" or in --include-path {args.include_path}" if args.include_path else " (--include-path adds yours)"
        raise CommandError(f"--tasks: no task {', '.join(map(repr, unknown))} in lm-eval{where}")
    model = harness.EttinLM(
        args.model, batch_size=args.batch_size, max_length=args.max_length, max_gen_toks=args.max_gen_toks,
        add_bos_token=True if args.add_bos_token else None, seed=args.seed, **_model_kwargs(args),
    )  # fmt: skip
    results = lm_eval.simple_evaluate(
        model=model, tasks=args.task_list, num_fewshot=args.num_fewshot, limit=args.limit,
        log_samples=args.log_samples, task_manager=manager, random_seed=args.seed, numpy_random_seed=args.seed,
        torch_random_seed=args.seed, fewshot_random_seed=args.seed,
    )  # fmt: skip
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.output_path:
        samples = results.pop("samples", {})
        # What lm-eval writes: its results, made JSON by its own rules (dtypes, functions).
        files.write_json(args.output_path, json.loads(json.dumps(results, default=handle_non_serializable)))
        for task, records in samples.items():
            path = _samples_path(args.output_path, task)
            files.write_jsonl(path, json.loads(json.dumps(records, default=handle_non_serializable)))
        print(f"wrote {args.output_path}" + (f" and {len(samples)} samples files" if samples else ""), file=sys.stderr)
    return 0


def _check_perplexity(args: argparse.Namespace) -> None:
    _at_least(args, 1, "batch_size", "max_length")
    args.texts = evaluation.read_texts(args.file, args.text_column)  # a bad file fails before the model loads


def _perplexity(args: argparse.Namespace) -> int:
    if not hasattr(args, "texts"):
        _check_perplexity(args)
    generator = pipeline("text-generation", model=args.model, **_model_kwargs(args))
    result = evaluation.perplexity(
        generator.model, generator.tokenizer, args.texts, max_length=args.max_length, batch_size=args.batch_size
    )
    print(json.dumps(result.as_dict()))
    return 0


# ---- train --------------------------------------------------------------------------------
def _train_args(args: argparse.Namespace) -> ettin_jax.train.TrainArgs:
    fields = {f.name for f in dataclasses.fields(ettin_jax.train.TrainArgs)}
    return ettin_jax.train.TrainArgs(**{k: v for k, v in vars(args).items() if k in fields})


def _prepare_training(args: argparse.Namespace) -> None:
    ettin_jax.train.prepare_host(_train_args(args))


def _train(args: argparse.Namespace) -> int:
    summary = ettin_jax.train.train(_train_args(args))
    print(ettin_jax.train.main_summary(summary))
    return ettin_jax.train.PREEMPTED_EXIT if summary["status"] == "preempted" else 0


def _flag_type(annotation: typing.Any) -> typing.Any:
    """`int | None` -> int: the type of the value a flag gives."""
    kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)]
    return kinds[0] if kinds else annotation


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, task: str) -> None:
    """A flag for every field of the dataclass `cls` that subcommand `task` takes, read from
    the fields themselves (the metadata is described in `ettin_jax.train.args`): the dataclass
    is the one list of arguments and defaults."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, typing.Any] = {}
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if not meta.get("cli", True) or task not in meta.get("tasks", (task,)):
            continue
        flag = meta.get("flag", "--" + field.name.replace("_", "-"))
        options: dict[str, typing.Any] = {"dest": field.name, "help": meta.get("help")}
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        kind = _flag_type(hints[field.name])
        if kind is bool:
            options["action"] = "store_false" if field.default else "store_true"
        else:
            options.update(type=kind, choices=meta.get("choices"), default=None if required else field.default)
        if "group" in meta:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group(required=True)
            groups[meta["group"]].add_argument(flag, **options)
        else:
            parser.add_argument(flag, required=required, **options)


def _add_train(commands: typing.Any) -> None:
    train = commands.add_parser("train", help="fine-tune a classifier or continue causal-LM training")
    tasks = train.add_subparsers(dest="task", required=True)
    classify = tasks.add_parser(
        "classify",
        help="sequence classification: single-label, multi-label or regression",
        description="Fine-tune a sequence classifier. Labels: a class per row (single-label), a list or "
        "comma-separated labels (multi-label), or a number (regression); the problem type is inferred "
        "from the training labels unless --problem-type is given.",
    )
    lm = tasks.add_parser(
        "lm", help="causal-LM training on packed blocks of text", description="Continue causal-LM training."
    )
    for task, parser in (("classify", classify), ("lm", lm)):
        add_dataclass_flags(parser, ettin_jax.train.TrainArgs, task)
        _add_device_flags(parser)
        parser.set_defaults(run=_train, prepare=_prepare_training)


# ---- devices and processes ----------------------------------------------------------------
def _add_device_flags(parser: argparse.ArgumentParser) -> None:
    """--mesh and the multi-process flags, shared by `generate` and `train`."""
    group = parser.add_argument_group("devices and processes")
    group.add_argument(
        "--mesh",
        help="device mesh, e.g. data=4,fsdp=2,tensor=1 (the product is the device count of all processes; "
        "one size may be -1); default: one device",
    )
    group.add_argument(
        "--distributed", action="store_true", help="join the other processes (TPU pods: found automatically)"
    )
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (implies --distributed)")
    group.add_argument("--num-processes", type=int, help="how many processes take part")
    group.add_argument("--process-id", type=int, help="this process's index, from 0")
    group.add_argument(
        "--distributed-timeout",
        type=int,
        default=distributed.DEFAULT_TIMEOUT,
        help="seconds to wait for the other processes",
    )


def _join_processes(args: argparse.Namespace) -> None:
    """Initializes jax.distributed if the flags ask for it; call before anything else runs JAX."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if args.distributed or any(x is not None for x in explicit):
        distributed.initialize(args.coordinator, args.num_processes, args.process_id, timeout=args.distributed_timeout)


# ---- the parser ---------------------------------------------------------------------------
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
    convert.add_argument(
        "--overwrite", action="store_true", help="replace DST if it exists (never the source, nor what holds it)"
    )
    _add_quantization_flags(convert, kv=False)
    _add_nonfinite_flag(convert)
    convert.set_defaults(run=_convert, check=_check_convert)

    model_help = (
        "a directory or a Hub id (default: the embedded default model, trained on Python's documentation; see README)"
    )
    generate = commands.add_parser("generate", help="sample text", description="Sample text from a causal LM.")
    generate.add_argument("prompt", nargs="*", help="prompts (default: one per line of stdin)")
    generate.add_argument("--model", help=model_help)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--min-p", type=float)
    generate.add_argument("--repetition-penalty", type=float)
    generate.add_argument(
        "--num-return-sequences",
        type=int,
        default=1,
        help="samples per prompt (with --do-sample); the j-th of n samples of prompt i (from 0) is drawn with "
        "seed --seed + i*n + j, whichever process or batch makes it",
    )
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument(
        "--stop", action="append", metavar="TEXT",
        help="end a completion before this text (repeat for several); its token is the last one made",
    )  # fmt: skip
    generate.add_argument(
        "--max-batch-size",
        "--batch-size",
        type=int,
        help="decode slots: requests served at once (default: as many as a quarter of the device's memory holds, "
        "at most 64)",
    )
    generate.add_argument("--dtype", choices=DTYPES, default="float32")
    _add_quantization_flags(generate)
    generate.add_argument("--input-file", help='prompts: .txt (one a line) or .jsonl ({"prompt": ...})')
    generate.add_argument(
        "--output-file",
        help='results as .jsonl, a line per prompt in input order ({"prompt", "generated_text"}, or "error" for '
        "a prompt that cannot run), each written once it and those before it are done; never overwritten",
    )
    generate.add_argument(
        "--resume",
        action="store_true",
        help="continue the job that wrote --output-file (killed or preempted): keep its results, make the rest",
    )
    _add_nonfinite_flag(generate)
    _add_device_flags(generate)
    generate.set_defaults(run=_generate, check=_check_generate)

    run = commands.add_parser("run", help="a pipeline over stdin, like `transformers run`")
    run.add_argument("--task", required=True, choices=("text-generation", "text-classification"))
    run.add_argument("--model", help=model_help)
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--dtype", choices=DTYPES, default="float32")
    _add_quantization_flags(run)
    _add_nonfinite_flag(run)
    run.set_defaults(run=_run, check=_check_run)

    serve = commands.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server",
        description="Serve a causal LM over OpenAI's API (/v1/completions, /v1/chat/completions with a chat "
        "template, /v1/models, /health, /metrics) on the continuous-batching engine. Plain HTTP on 127.0.0.1 by "
        "default; put a reverse proxy in front for TLS. SIGTERM drains: no new requests, those in flight finish.",
    )
    serve.add_argument("--model", help=model_help)
    serve.add_argument("--host", default="127.0.0.1", help="the address to bind (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key", help=f"require 'Authorization: Bearer KEY' on every request but /health (or ${server.API_KEY_ENV})"
    )
    serve.add_argument("--served-model-name", help="the model's name in the API (default: --model)")
    serve.add_argument(
        "--max-batch-size", type=int, help="decode slots: requests served at once (default: from device memory)"
    )
    serve.add_argument("--max-length", type=int, help="most tokens a request holds (default: the model's context)")
    serve.add_argument("--dtype", choices=DTYPES, default="float32")
    _add_quantization_flags(serve)
    serve.add_argument("--mesh", help="device mesh, e.g. data=4,tensor=2 (default: one device)")
    serve.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template for /v1/chat/completions")
    serve.add_argument("--max-n", type=int, default=16, help="the most choices (n) a request may ask for")
    serve.add_argument("--max-tokens", type=int, help="the most new tokens a request may ask for (default: context)")
    serve.add_argument("--max-logprobs", type=int, default=20, help="the most top logprobs a request may ask for")
    serve.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    serve.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds that requests in flight get after SIGTERM"
    )
    _add_nonfinite_flag(serve)
    serve.set_defaults(run=_serve, check=_check_serve)

    _add_eval(commands, model_help)
    _add_train(commands)
    _add_compilation_cache_flag(parser)
    return parser


def _add_eval(commands: typing.Any, model_help: str) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="lm-evaluation-harness tasks",
        description="Run lm-evaluation-harness tasks on a causal LM (ettin_jax.harness.EttinLM, which scores as "
        "lm-eval's hf backend does) and print its table.",
    )
    evaluate.add_argument("--model", help=model_help)
    evaluate.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names")
    evaluate.add_argument("--include-path", metavar="DIR", help="a directory of your own task YAMLs")
    evaluate.add_argument("--num-fewshot", type=int, help="examples in each prompt (default: the task's)")
    evaluate.add_argument("--limit", type=float, help="documents per task: a count, or a fraction below 1")
    evaluate.add_argument(
        "--batch-size",
        type=int,
        help=f"requests per batch (default: as many as {scoring.LOGLIKELIHOOD_BATCH_TOKENS} tokens hold)",
    )
    evaluate.add_argument("--max-length", type=int, help="most tokens a request reads (default: the model's context)")
    evaluate.add_argument("--max-gen-toks", type=int, default=256, help="generate_until's default token budget")
    evaluate.add_argument(
        "--add-bos-token",
        action="store_true",
        help="start every request with BOS, as the Ettin paper evaluated (lm-eval's add_bos_token=True)",
    )
    evaluate.add_argument(
        "--seed", type=int, default=0, help="lm-eval's seeds (few-shot sampling) and sampled generations'"
    )
    evaluate.add_argument(
        "--output-path", metavar="FILE", help="lm-eval's results JSON, written here (never over a file)"
    )
    evaluate.add_argument(
        "--log-samples", action="store_true", help="also write each task's samples, FILE_samples_TASK.jsonl"
    )
    evaluate.add_argument("--dtype", choices=DTYPES, default="float32")
    _add_quantization_flags(evaluate, kv=False)
    _add_nonfinite_flag(evaluate)
    evaluate.set_defaults(run=_eval, check=_check_eval)

    ppl = commands.add_parser(
        "perplexity",
        help="the perplexity of a text file",
        description="Score a text (.txt: the whole file; .jsonl: each line's text field) from BOS, in windows of the "
        "model's context, and print token and word perplexity and bits per byte as JSON.",
    )
    ppl.add_argument("--model", help=model_help)
    ppl.add_argument("--file", required=True, help=".txt or .jsonl")
    ppl.add_argument("--text-column", default="text", help="the field of a .jsonl line that holds its text")
    ppl.add_argument("--max-length", type=int, help="the window, in tokens (default: the model's context)")
    ppl.add_argument(
        "--batch-size", type=int,
        help=f"windows per batch (default: as many as {scoring.LOGLIKELIHOOD_BATCH_TOKENS} tokens hold)",
    )  # fmt: skip
    ppl.add_argument("--dtype", choices=DTYPES, default="float32")
    _add_quantization_flags(ppl, kv=False)
    _add_nonfinite_flag(ppl)
    ppl.set_defaults(run=_perplexity, check=_check_perplexity)


def _add_quantization_flags(parser: argparse.ArgumentParser, kv: bool = True) -> None:
    parser.add_argument(
        "--quantize", choices=QUANTIZATIONS,
        help="int8 weights (per output channel), quantized as the model loads (default: as the checkpoint is)",
    )  # fmt: skip
    if kv:
        parser.add_argument(
            "--kv-cache-dtype", choices=KV_CACHE_DTYPES,
            help="the global layers' KV cache: auto (the compute dtype) or int8 (per token and head)",
        )  # fmt: skip


def _add_nonfinite_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="load a checkpoint whose weights hold NaN or inf, with a warning (by default an error naming the tensor)",
    )


def _add_compilation_cache_flag(parser: argparse.ArgumentParser, default: typing.Any = None) -> None:
    """--compilation-cache, before the command or after it (every command compiles): on a
    command's parser it leaves the value given before the command alone unless given again."""
    parser.add_argument(
        "--compilation-cache",
        metavar="DIR|off",
        default=default,
        help=f"JAX's persistent compilation cache (default: ${compile_cache.ENV}, else <ettin-jax home>/jax-cache)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _add_compilation_cache_flag(command, argparse.SUPPRESS)


@contextlib.contextmanager
def _log_to_stderr() -> Iterator[None]:
    """Our loggers at INFO on stderr while a command runs; other libraries' loggers untouched,
    and ours restored afterwards (main() may run inside another program, or a test)."""
    logger = logging.getLogger("ettin_jax")
    saved = logger.level, logger.propagate
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a root handler (set up by a library) would print each line twice
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _one_line(error: BaseException) -> str:
    """An error as one line: an OSError as "FILE: reason", a message of several lines (a list
    of problems) joined with "; "."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.filename}: {error.strerror}"
        if error.filename2 is not None:
            text += f" (and {error.filename2})"
    else:
        text = str(error) or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return "".join(lines)
    return f"{lines[0]} {'; '.join(lines[1:])}"


def _out_of_memory(error: Exception) -> bool:
    return isinstance(error, MemoryError) or (
        isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a command. A mistake in the input (an `EttinError`, an `OSError`) is one line on
    stderr, `error: ...`, and exit status 2; anything else is a bug of ours: its traceback, a
    line saying so, and exit status 1."""
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "check"):
            args.check(args)  # the arguments, before any work (and before joining other processes)
        with _log_to_stderr(), compile_cache.compilation_cache(args.compilation_cache):
            if hasattr(args, "prepare"):
                args.prepare(args)  # a command's set-up before anything runs JAX
            if hasattr(args, "distributed"):
                _join_processes(args)  # before anything runs JAX
            return args.run(args)
    except (EttinError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if _out_of_memory(e):
            print(f"error: out of memory: {_one_line(e).split('; ')[0]}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(
            "error: this is a bug in ettin-jax, not a mistake in the input: please report it with the command that "
            "ran and the traceback above",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
