"""The fine-tuning loop behind `ettin-jax train classify|lm`.

An output directory holds one run:

    run.json        the arguments that define the run (a resume must match them)
    checkpoints/N/  orbax checkpoints: params, optimizer state, step, RNG, data position, and a
                    fingerprint of the data (a resume must read the same bytes)
    metrics.jsonl   one JSON object per logging or evaluation step
    metrics.png     loss and metric curves
    final/, best/   the final and the best model in transformers format, with the tokenizer

Checkpoints are written asynchronously every `save_steps` (or at each epoch's end) and at every
evaluation (every `eval_steps`, or at each epoch's end); the last `save_total_limit` and the best
by `metric_for_best` are kept. `early_stopping_patience` ends the run after that many evaluations
without a better best. SIGTERM (a pod's preemption notice) finishes the current step, writes a
checkpoint and exits with status 143; `--resume` then continues exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ettin_jax import compilation, default_model, distributed, losses, platforms, sharding
from ettin_jax.config import ETTIN_SIZES, ModernBertDecoderConfig
from ettin_jax.convert import load_pretrained, resolve, save_transformers, transformers_state_dict
from ettin_jax.files import publish, staging_dir_for, write_json, write_jsonl
from ettin_jax.modeling import ModernBertDecoderForCausalLM, ModernBertDecoderForSequenceClassification
from ettin_jax.train import data, lora, metrics, report, steps, stream
from ettin_jax.train.args import TrainArgs, TrainingError, parse_class_weights
from ettin_jax.train.data import Batches, Examples
from ettin_jax.train.optim import OptimizerConfig, learning_rate_schedule, make_optimizer

log = logging.getLogger("ettin_jax.train")

PREEMPTED_EXIT = 143  # 128 + SIGTERM


def prepare_host(args: TrainArgs) -> None:
    """Call before anything starts JAX (`jax.distributed.initialize` included), as the train
    command does: when JAX will run on CPU, unless `release_host_memory`, glibc's malloc keeps
    the memory it frees (`compilation.keep_host_memory`). Never called by `train`: it changes
    the whole process."""
    if not args.release_host_memory and platforms.will_run_on_cpu():
        compilation.keep_host_memory()


# ---- the output directory -----------------------------------------------------------------
# The files a run writes at its top level; a run that fails before its first step removes them.
_RUN_FILES = ("run.json", "metrics.jsonl", "metrics.png")


def prepare_output_dir(args: TrainArgs) -> bool:
    """Checks, then creates the output directory; True when there is a run to resume."""
    resuming = _check_output_dir(args)
    _create_output_dir(args, resuming)
    return resuming


def _create_output_dir(args: TrainArgs, resuming: bool) -> bool:
    """Creates the run in the output directory (deleting the old one for --overwrite) unless
    resuming; True when the directory itself was created. `train` calls it once the data has
    been read and checked, so a run refused for its data or flags writes nothing. With several
    processes, each checks (again: nothing may have appeared meanwhile), then process 0 alone
    writes."""
    if _check_output_dir(args) != resuming:
        raise TrainingError(f"{args.output_dir} changed while the run was being prepared; start it again")
    distributed.barrier("output-dir-checked")
    created = False
    if distributed.is_primary() and not resuming:
        existed = os.path.isdir(args.output_dir)
        if args.overwrite and existed:
            shutil.rmtree(args.output_dir)
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(os.path.join(args.output_dir, "run.json"), args.identity())
        created = not existed
    distributed.barrier("output-dir-ready")
    return created


def _remove_unstarted_run(out: str, created: bool) -> None:
    """Undoes `_create_output_dir` for a run that failed before its first step, so that the same
    command can run again: the run's own files (never a checkpoint) and, if the run created it,
    the directory once empty."""
    checkpoints = os.path.join(out, "checkpoints")
    if os.path.isdir(checkpoints) and not any(name.isdigit() for name in os.listdir(checkpoints)):
        shutil.rmtree(checkpoints, ignore_errors=True)
    for name in _RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))
    if created:
        with contextlib.suppress(OSError):  # not empty: something else is there, and stays
            os.rmdir(out)
    log.warning("the run failed before its first step: removed what it had written to %s", out)


def _inside(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies inside it, however either is spelt."""
    directory = os.path.realpath(directory)
    return os.path.commonpath([directory, os.path.realpath(path)]) == directory


def _check_output_dir(args: TrainArgs) -> bool:
    out = args.output_dir
    run_file = os.path.join(out, "run.json")
    if os.path.isdir(out) and os.listdir(out):
        if args.overwrite:
            inputs = {
                "--train-file": args.train_file, "--eval-file": args.eval_file, "--model": args.model,
                "--config": args.config, "--tokenizer": args.tokenizer,
            }  # fmt: skip
            for flag, path in inputs.items():
                if path is not None and os.path.exists(path) and _inside(path, out):
                    raise TrainingError(
                        f"{flag} {path} is inside --output-dir {out}, which --overwrite would delete; "
                        "move it or choose another --output-dir"
                    )
            if not os.path.isfile(run_file):
                raise TrainingError(
                    f"{out} is not empty and holds no ettin-jax run (no run.json); refusing to delete it, "
                    "choose another --output-dir"
                )
            return False  # deleted by prepare_output_dir
        elif not os.path.isfile(run_file):
            raise TrainingError(f"{out} is not empty and holds no ettin-jax run (no run.json); choose another")
        elif not args.resume:
            raise TrainingError(f"{out} holds a run already; pass --resume to continue it or --overwrite to start over")
        else:
            with open(run_file, encoding="utf-8") as f:
                saved = json.load(f)
            ours = json.loads(json.dumps(args.identity()))
            differ = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
            if differ:
                details = ", ".join(f"{k}: {saved.get(k)!r} -> {ours.get(k)!r}" for k in differ)
                raise TrainingError(f"{out} holds a different run; --resume needs the same arguments ({details})")
            return True
    return False


# ---- data and model -----------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
    model: Any
    tokenizer: Any
    train: Examples
    eval: Examples | None
    problem_type: str
    label_names: tuple[str, ...]
    pad_id: int
    base_model: str | None = None  # what LoRA adapts: --model as given, or the default model's directory
    data: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # split -> its source and fingerprint


def prepare(args: TrainArgs) -> Prepared:
    """Reads and checks the data (before the model is touched: a bad file or column fails fast),
    then tokenizes it and loads the model with a head for its labels (sharded over `args.mesh` if
    given), or with `args.config`, a new causal LM with random weights from `args.seed`. Every
    process indexes all the data (`stream`: byte offsets and labels, no texts are held); a
    batch's texts are read and tokenized as training reaches it, each process only its own
    devices' rows."""
    from transformers import AutoTokenizer

    mesh = sharding.mesh_from_arg(args.mesh)
    ways = sharding.batch_ways(mesh)
    for flag, size in (("--batch-size", args.batch_size), ("--eval-batch-size", args.eval_batch_size)):
        if size is not None and size % ways:
            raise TrainingError(f"{flag} {size} does not split over the mesh's {ways} batch shards (data x fsdp)")

    tables = _index_data(args)
    paths = {split: t.name for split, t in tables.items()}
    sources = {split: {"source": t.name, "blake2b": t.fingerprint} for split, t in tables.items()}
    if args.task == "classify":
        values = {split: t.labels for split, t in tables.items()}
        kind = args.problem_type or data.infer_problem_type(
            values["train"], paths["train"], args.label_column, tables["train"].lines
        )
        if kind != "multi_label_classification":  # multi-label's f1_<label> waits for the label set
            _check_metric(args, kind)
        if kind == "regression":  # every label a number: checked now, before the model is read
            for split, t in tables.items():
                data.encode_labels(values[split], kind, ("LABEL_0",), paths[split], args.label_column, t.lines)

    scratch = args.config is not None
    directory = None if scratch else default_model.path() if args.model is None else resolve(args.model)
    tokenizer = (
        _load_tokenizer(args.tokenizer) if args.tokenizer is not None else AutoTokenizer.from_pretrained(directory)
    )
    config = _scratch_config(args.config, tokenizer) if scratch else ModernBertDecoderConfig.from_pretrained(directory)
    _check_vocabulary(config, tokenizer, args, directory)
    pad_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    if pad_id is None:
        where = f"--config {args.config}" if scratch else f"{directory}/config.json"
        raise TrainingError(f"neither {where} nor its tokenizer sets a pad token id")
    bos, eos = config.bos_token_id, config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    length = _row_length(args, config)  # a classifier's --max-length or an LM's --block-size
    dtype = jnp.dtype(args.dtype)

    if args.task == "lm":
        examples = {}
        for split, t in tables.items():
            examples[split] = stream.lm_blocks(t, tokenizer, args.text_column, length, bos, eos)
        if scratch:
            model = _new_model(config, dtype, args.seed, mesh)
        else:
            model = load_pretrained(ModernBertDecoderForCausalLM, directory, dtype=dtype, seed=args.seed, mesh=mesh)
        _with_lora(model, args)
        return Prepared(
            model, tokenizer, examples["train"], examples.get("eval"), "causal_lm", (), pad_id, args.model or directory,
            sources,
        )  # fmt: skip

    names = _label_set(config, directory, kind, values["train"])
    _check_metric(args, kind, names)
    log.info(
        "labels: %s%s%s",
        kind,
        "" if kind == "regression" else f", {len(names)} classes",
        "" if args.problem_type else f" (inferred from {paths['train']}; --problem-type chooses another)",
    )
    examples = {}
    for split, t in tables.items():
        labels = data.encode_labels(values[split], kind, names, paths[split], args.label_column, t.lines)
        # --pack refuses a training example longer than a row (PackedBatches) rather than cut it.
        limit = config.max_position_embeddings if args.pack and split == "train" else length
        t.labels = None  # encoded: the raw column is no longer needed
        # Tokenized as batches need them; TokenizedRows warns when it truncates a text.
        ids = stream.TokenizedRows(t, tokenizer, args.text_column, args.text_pair_column, limit, bos, split)
        examples[split] = Examples(ids, labels)
    model = load_pretrained(
        ModernBertDecoderForSequenceClassification,
        directory,
        dtype=dtype,
        seed=args.seed,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        problem_type=kind,
        pad_token_id=pad_id,
        mesh=mesh,
    )
    _with_lora(model, args)
    return Prepared(
        model, tokenizer, examples["train"], examples.get("eval"), kind, names, pad_id, args.model or directory, sources
    )


def _index_data(args: TrainArgs) -> dict[str, stream.RowIndex]:
    """Each split's row index, every row checked: --train-file and --eval-file, or --dataset's
    --split and --eval-split."""
    columns: dict[str, Any] = {"text_column": args.text_column}
    if args.task == "classify":
        columns.update(pair_column=args.text_pair_column, label_column=args.label_column)
    if args.dataset is not None:
        where = {"dataset": args.dataset, "config": args.dataset_config}
        tables = {"train": stream.index_split(**where, split=args.split or "train", **columns)}
        if args.eval_split:
            tables["eval"] = stream.index_split(**where, split=args.eval_split, **columns)
        return tables
    tables = {"train": stream.index_split(args.train_file, **columns)}
    if args.eval_file:
        tables["eval"] = stream.index_split(args.eval_file, **columns)
    return tables


def _with_lora(model: Any, args: TrainArgs) -> None:
    """With --lora-rank, LoRA on the model (placed on its mesh): the same adapters, from
    --seed, for a run and its resumption."""
    if args.lora_rank is None:
        return
    config = lora.LoraConfig(
        args.lora_rank, args.lora_alpha, args.lora_targets or lora.DEFAULT_TARGETS, args.lora_dropout
    )
    try:
        lora.apply_lora(model, config, seed=args.seed)
    except lora.LoraError as e:
        raise TrainingError(f"--lora-targets: {e}") from None


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise TrainingError(f"--tokenizer {path} is not a directory; pass the directory that holds tokenizer.json")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a directory without a tokenizer
        raise TrainingError(
            f"--tokenizer {path} holds no tokenizer that transformers loads ({type(e).__name__}: {e})"
        ) from e


def _scratch_config(shape: str, tokenizer: Any) -> ModernBertDecoderConfig:
    """The config of a model trained from scratch. An Ettin size takes its special token ids
    from the tokenizer ([CLS] as BOS, [SEP] as EOS where it names no BOS and EOS, as Ettin's) and
    its vocabulary from the tokenizer's size, rounded up to a multiple of 64 as Ettin's is; a
    config.json is taken as written."""
    if shape in ETTIN_SIZES:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if bos is None or eos is None:
            raise TrainingError(
                "--tokenizer names no BOS (or [CLS]) and EOS (or [SEP]) token, which every packed text starts "
                "and ends with; add them to its special tokens, or pass a config.json as --config"
            )
        return ModernBertDecoderConfig.ettin(
            shape, vocab_size=-(-len(tokenizer) // 64) * 64, bos_token_id=bos, eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
        )  # fmt: skip
    if not os.path.exists(shape):
        raise TrainingError(
            f"--config {shape} is neither an Ettin size ({', '.join(ETTIN_SIZES)}) nor a config.json file or directory"
        )
    try:
        return ModernBertDecoderConfig.from_pretrained(shape)
    except (OSError, ValueError) as e:
        raise TrainingError(f"--config {shape}: {e}") from None


def _check_vocabulary(config: ModernBertDecoderConfig, tokenizer: Any, args: TrainArgs, directory: str | None) -> None:
    """Every id the tokenizer gives, and the config's special ids, must be rows of the embedding."""
    source = f"--config {args.config}" if directory is None else directory
    words = f"--tokenizer {args.tokenizer}" if args.tokenizer is not None else f"the tokenizer in {directory}"
    if len(tokenizer) > config.vocab_size:
        raise TrainingError(
            f"{source} has vocab_size {config.vocab_size}, smaller than the {len(tokenizer)} tokens of {words}; "
            "the model needs a row for every token"
        )
    eos = config.eos_token_id
    for name, value in (("bos_token_id", config.bos_token_id), ("pad_token_id", config.pad_token_id),
                        *(("eos_token_id", e) for e in (eos if isinstance(eos, tuple) else (eos,)))):  # fmt: skip
        if value is not None and not 0 <= value < config.vocab_size:
            raise TrainingError(f"{source} has {name} {value}, outside its vocabulary of {config.vocab_size}")


def _new_model(config: ModernBertDecoderConfig, dtype: Any, seed: int, mesh: Any) -> Any:
    """A causal LM with random weights from `seed`, transformers' initialisation; every process
    builds the same one (checked), then places it on the mesh."""
    distributed.agree("config", distributed.fingerprint(json.dumps(config.to_dict(), sort_keys=True), seed))
    model = ModernBertDecoderForCausalLM(config, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
    return model if mesh is None else sharding.shard_model(model, mesh)


def _check_metric(args: TrainArgs, kind: str, names: tuple[str, ...] | None = None) -> None:
    """--metric-for-best against what evaluating this problem type reports."""
    try:
        metrics.check_metric(args.metric_for_best, kind, names if kind == "multi_label_classification" else None)
    except ValueError as e:
        raise TrainingError(f"--metric-for-best: {e}") from None


def _label_set(config: Any, directory: str, kind: str, values: list[Any]) -> tuple[str, ...]:
    """The checkpoint's own labels when it is a classifier for this problem with named labels,
    else the training column's."""
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        architectures = json.load(f).get("architectures") or []
    named = not all(n == f"LABEL_{i}" for i, n in enumerate(config.label_names))
    if "ModernBertDecoderForSequenceClassification" in architectures and named and config.problem_type == kind:
        return tuple(config.label_names)
    return data.label_names(values, kind)


# ---- the loop -----------------------------------------------------------------------------
def train(args: TrainArgs, prepared: Prepared | None = None, *, on_step: Any = None) -> dict[str, Any]:
    """Runs (or resumes) a fine-tuning run; returns a summary. `on_step(step, metrics)`, if
    given, is called after every step (tests use it to stop a run part-way)."""
    # The directory is checked first (read only) and written only once the data has been read
    # and checked: a run refused for its data or flags leaves nothing behind, and one that fails
    # before its first step removes what it wrote, so the corrected command runs as it is.
    resuming = _check_output_dir(args)
    prepared = prepared or prepare(args)
    train_batches = _train_batches(args, prepared)
    class_weights = _class_weights(args, prepared)
    if args.report_to == "tensorboard":
        report.tensorboardx()  # installed, or refused now
    created = _create_output_dir(args, resuming)
    stepped: list[int] = []  # the steps this call has run with a finite loss
    try:
        return _train(args, prepared, train_batches, class_weights, resuming, on_step, stepped)
    except BaseException:
        if not resuming and not stepped and distributed.is_primary():
            _remove_unstarted_run(args.output_dir, created)
        raise


def _train_batches(args: TrainArgs, prepared: Prepared) -> Batches:
    length = _row_length(args, prepared.model.config)
    if args.task == "lm":  # blocks read from the token file: nothing to tokenize
        return Batches(
            prepared.train, args.batch_size, prepared.pad_id, length, grad_accum=args.grad_accum, seed=args.seed
        )
    if not args.pack:  # each process tokenizes the rows its devices hold, as batches come
        held = stream.held_rows(sharding.mesh_from_arg(args.mesh), args.batch_size, args.grad_accum)
        return stream.StreamBatches(prepared.train, args.batch_size, prepared.pad_id, length,
                                    grad_accum=args.grad_accum, seed=args.seed, held=held)  # fmt: skip
    batches = stream.PackedStream(
        prepared.train, args.batch_size, prepared.pad_id, length, grad_accum=args.grad_accum, seed=args.seed
    )
    rows, tokens = len(batches.plan(0)), int(batches.lengths.sum())
    log.info("--pack: %d examples in %d rows of %d tokens, %.1f%% of them real (epoch 0)",
             len(prepared.train), rows, length, 100 * tokens / (rows * length))  # fmt: skip
    return batches


def _row_length(args: TrainArgs, config: Any) -> int:
    """The most tokens a row holds: --max-length (classify) or --block-size (lm), within the
    model's positions."""
    return min(args.max_length if args.task == "classify" else args.block_size, config.max_position_embeddings)


def _class_weights(args: TrainArgs, prepared: Prepared) -> np.ndarray | None:
    """--class-weights as (L,) weights, and --label-smoothing checked, against the labels."""
    kind, names = prepared.problem_type, prepared.label_names
    if args.label_smoothing and kind not in ("causal_lm", "single_label_classification"):
        raise TrainingError(f"--label-smoothing smooths a softmax over classes; {kind} has none")
    if args.class_weights is None:
        return None
    if kind == "regression":
        raise TrainingError("--class-weights weigh classes; regression has none")
    if args.class_weights.strip() == "auto":
        try:
            return losses.balanced_class_weights(prepared.train.labels, kind, names)
        except ValueError as e:
            raise TrainingError(f"--class-weights auto: {e}") from None
    weights = parse_class_weights(args.class_weights)
    if len(weights) != len(names):
        raise TrainingError(
            f"--class-weights gives {len(weights)} weights for {len(names)} classes ({', '.join(names)}); "
            "give one per class, in that order"
        )
    return np.asarray(weights, np.float32)


def _train(
    args: TrainArgs,
    prepared: Prepared,
    train_batches: Batches,
    class_weights: np.ndarray | None,
    resuming: bool,
    on_step: Any,
    stepped: list[int],
) -> dict[str, Any]:
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    out = os.path.abspath(args.output_dir)
    total = args.max_steps or sum(train_batches.count(epoch) for epoch in range(args.epochs))
    opt = OptimizerConfig(
        learning_rate=args.learning_rate,
        schedule=args.schedule,
        warmup_steps=math.ceil(args.warmup_ratio * total),
        total_steps=total,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
    )
    schedule = learning_rate_schedule(opt)
    model = prepared.model
    model.model.remat = args.remat
    trainable = nnx.Param if args.lora_rank is None else lora.TRAINABLE
    state = steps.create_train_state(
        model,
        make_optimizer(opt),
        args.seed,
        trainable,
        class_weights=class_weights,
        label_smoothing=args.label_smoothing,
    )
    mesh = sharding.mesh_of(state.params)
    primary = distributed.is_primary()  # the one process that writes the run's files

    # The best checkpoint is the one the trainer picked (metrics.is_better: the first of equals).
    # orbax keeps it by "best_rank", which counts the improvements; other checkpoints rank -1.
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
            ocp.checkpoint_managers.LatestN(n=args.save_total_limit),
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m["best_rank"], reverse=False, n=1, keep_checkpoints_without_metrics=False
            ),
        ]
    )
    manager = ocp.CheckpointManager(
        os.path.join(out, "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=True, cleanup_tmp_directories=True
        ),
    )
    position = {"epoch": 0, "index": 0}
    # The best evaluation so far, and how many evaluations since it (for early stopping).
    best: dict[str, Any] = {"step": None, "value": None, "rank": 0, "stale": 0}
    metrics_path = os.path.join(out, "metrics.jsonl")
    start = 0
    if resuming and manager.latest_step() is not None:
        start = manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state.checkpoint())
        try:
            restored = manager.restore(
                start,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), trainer=ocp.args.JsonRestore()),
            )
            state = state.restore(restored["state"])
        except Exception as e:  # orbax's errors for a damaged or foreign checkpoint are of many types
            raise TrainingError(
                f"checkpoint {start} in {out}/checkpoints cannot be restored ({type(e).__name__}: {e}); "
                "the run is left as it is"
            ) from e
        position, best = restored["trainer"]["position"], restored["trainer"]["best"]
        _check_same_data(restored["trainer"].get("data", {}), prepared.data, start)
        log.info("resumed from step %d (epoch %d, batch %d)", start, position["epoch"], position["index"])
    elif resuming:
        log.info("--resume: %s has no checkpoint yet; starting from step 0", out)
    # The metrics file tells one run's story: drop what a killed run logged after its checkpoint.
    kept = [r for r in metrics.read_metrics(metrics_path) if r["step"] <= start] if os.path.exists(metrics_path) else []
    if primary:
        write_jsonl(metrics_path, kept)

    def save(step: int, evaluated: dict[str, float] | None) -> None:
        # A copy: the loop mutates `position` in place while the save goes on in the background.
        trainer_state = json.loads(
            json.dumps({"position": position, "best": best, "step": step, "data": prepared.data})
        )
        saved = state.checkpoint()
        if platforms.on_cpu():
            # orbax's save() returns once it holds host copies of the arrays and writes them in
            # the background, while the next step donates the state's buffers. Off CPU those
            # copies are real (a finished device-to-host transfer). On CPU they are views of the
            # very buffers the next step donates (np.asarray copies nothing there); PjRt then
            # declines the donation (jax 0.10), but the checkpoint should not rest on that.
            saved = jax.tree.map(sharding.snapshot, saved)
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(saved), trainer=ocp.args.JsonSave(trainer_state)),
            metrics=None if evaluated is None else {"best_rank": best["rank"] if best["step"] == step else -1},
            force=True,
        )  # fmt: skip

    eval_every = args.eval_steps or args.save_steps

    def at(strategy: str, every: int, step: int, epoch_end: bool) -> bool:
        """Whether `step` evaluates or saves: every `every` steps, or at each epoch's end."""
        return epoch_end if strategy == "epoch" else step % every == 0

    # Throughput: real (not padding) tokens per second, and MFU where the device's peak is known.
    device = jax.devices()[0]
    peak = platforms.peak_flops(device, args.dtype)
    peak = None if peak is None else peak * (1 if mesh is None else mesh.devices.size)
    tensorboard = None
    if primary and args.report_to == "tensorboard":
        tensorboard = report.TensorBoardWriter(
            os.path.join(out, "tensorboard"), purge_step=start + 1 if resuming else None
        )
    step, window = start, []
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not args.progress, dynamic_ncols=True)

    def patience_spent() -> bool:
        patience = args.early_stopping_patience
        return patience is not None and best["stale"] >= patience

    # A run that stopped early, resumed, stays stopped: straight to its export.
    status = "stopped early" if patience_spent() and step < total else "finished"
    try:
        log_to = metrics_path if primary else os.devnull
        with distributed.Preemption() as preemption, open(log_to, "a", encoding="utf-8") as metrics_file:
            while step < total and status == "finished":
                started = time.perf_counter()
                batch, _ = train_batches.batch(position["epoch"], position["index"])
                flops = _step_flops(batch, model.config, args.task, args.lora_rank is not None)
                if mesh is not None:
                    batch = sharding.put_batch(batch, mesh, axis=1)  # (K, B, ...): rows split
                state, m = steps.train_step(state, batch, jax.random.fold_in(state.rng, state.step))
                m = {k: sharding.to_host(v) for k, v in m.items()}
                position = _advance(position, train_batches)
                epoch_end = position["index"] == 0
                step += 1
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    manager.wait_until_finished()
                    last = manager.latest_step()
                    raise TrainingError(
                        f"the training loss is {loss} at step {step}; stopped without saving this step. "
                        + (f"The last good checkpoint is step {last} in {out}/checkpoints; "
                           "lower the learning rate or check the data, then --resume."
                           if last is not None else "No checkpoint was saved before it.")
                    )  # fmt: skip
                stepped.append(step)  # a step with a finite loss: from here on, the run is kept
                # Throughput, in real (not padding) tokens; not of the first step, which compiles.
                work = (time.perf_counter() - started, int(m["tokens"]), flops)
                window.append((loss, float(m["grad_norm"]), None if step == start + 1 else work))
                if tensorboard is not None:
                    timed = {} if step == start + 1 else report.throughput(*work, peak)
                    learning_rate = float(schedule(step - 1))
                    tensorboard.write({"loss": loss, "learning_rate": learning_rate, **timed}, step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                record: dict[str, Any] = {}
                if step % args.log_steps == 0 or step == total:
                    record = {
                        "step": step,
                        "epoch": round(
                            position["epoch"] + position["index"] / train_batches.count(position["epoch"]), 4
                        ),
                        "loss": float(np.mean([w[0] for w in window])),
                        "grad_norm": float(np.mean([w[1] for w in window])),
                        "learning_rate": float(schedule(step - 1)),
                    }
                    timed = [w[2] for w in window if w[2] is not None]
                    if timed:
                        record.update(report.throughput(*map(sum, zip(*timed, strict=True)), peak))
                    window = []
                evaluated = None
                if prepared.eval is not None and (step == total or at(args.eval_strategy, eval_every, step, epoch_end)):
                    evaluated = evaluate(state, prepared, args)
                    record = {**record, "step": step, **evaluated}
                    value = evaluated.get(args.metric_for_best)
                    if value is None:
                        raise TrainingError(
                            f"--metric-for-best {args.metric_for_best} is not an eval metric of this task; "
                            f"choose one of {sorted(evaluated)}"
                        )
                    if metrics.is_better(args.metric_for_best, value, best["value"]):
                        best = {"step": step, "value": value, "rank": best["rank"] + 1, "stale": 0}
                    else:
                        best["stale"] += 1  # evaluations since the best
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in evaluated.items()))
                if record:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if tensorboard is not None:
                        tensorboard.write(evaluated or {}, step)
                        tensorboard.flush()
                if on_step is not None:
                    on_step(step, m)
                stop = preemption.agreed()
                early = evaluated is not None and patience_spent()
                if (
                    step == total
                    or at(args.save_strategy, args.save_steps, step, epoch_end)
                    or evaluated is not None
                    or stop
                ):
                    save(step, evaluated)
                if early and step < total:
                    status = "stopped early"
                    log.info("%s has not improved for %d evaluations: stopped at step %d",
                             args.metric_for_best, args.early_stopping_patience, step)  # fmt: skip
                    break
                if stop and step < total:
                    status = "preempted"
                    break
    finally:
        # Also on an exception: a checkpoint being written is finished, never left half-done.
        bar.close()
        if tensorboard is not None:
            tensorboard.close()
        manager.wait_until_finished()
    if primary:
        _plot(metrics_path, os.path.join(out, "metrics.png"))
    summary = {"status": status, "step": step, "total_steps": total, "best": best, "output_dir": out}
    if status == "preempted":
        log.warning("SIGTERM: saved a checkpoint at step %d in %s; continue with --resume", step, out)
        manager.close()
        return summary
    if not args.load_best_model_at_end:
        _export(state, prepared, os.path.join(out, "final"))
    if best["step"] is not None:
        if best["step"] != step:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state.checkpoint())
            restored = manager.restore(best["step"], args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            state = state.restore(restored["state"])
        _export(state, prepared, os.path.join(out, "best"))
        if args.load_best_model_at_end:
            _export(state, prepared, os.path.join(out, "final"))
    manager.close()
    return summary


def _check_same_data(saved: dict[str, dict[str, str]], ours: dict[str, dict[str, str]], step: int) -> None:
    """A resume reads the batches the run would have read only from the same training data: its
    bytes must be those checkpoint `step` was made with. Changed evaluation data only changes
    the metrics from here on (and so which checkpoint is best): a warning."""
    for split, then in saved.items():
        now = ours.get(split)
        if now is None or now["blake2b"] == then["blake2b"]:
            continue
        changed = f"the {split} data {now['source']} is not the data checkpoint {step} was made with ({then['source']})"
        if split != "train":
            log.warning("%s: its metrics from here on are not comparable with the earlier ones", changed)
            continue
        raise TrainingError(
            f"{changed}: its bytes changed since, so a resume would read other batches than the run did; "
            "restore that data, or train on the new data in another --output-dir"
        )


def _advance(position: dict[str, int], batches: Batches) -> dict[str, int]:
    """The data position after the batch at `position`: the next batch of its epoch, or the first
    of the next epoch that has one (packed rows may fall short of a batch in some epoch)."""
    epoch, index = position["epoch"], position["index"] + 1
    while index >= batches.count(epoch):
        epoch, index = epoch + 1, 0
    return {"epoch": epoch, "index": index}


def _step_flops(batch: dict[str, np.ndarray], config: Any, task: str, adapted: bool) -> float:
    """A training batch's model FLOPs: the forward's, times 3 with the backward (gradients of
    activations and of weights), times 2 under LoRA, whose frozen weights take no gradient (the
    adapters' own FLOPs are a rounding error)."""
    k, b, length = batch["input_ids"].shape
    forward = platforms.model_flops(config, k * b, length, causal_lm=task == "lm")
    return forward * (2 if adapted else 3)


def evaluate(state: Any, prepared: Prepared, args: TrainArgs) -> dict[str, float]:
    """Eval metrics, each prefixed `eval_`."""
    mesh = sharding.mesh_of(state.params)
    size = args.eval_batch_size or args.batch_size
    batches = Batches(prepared.eval, size, prepared.pad_id, _row_length(args, prepared.model.config), shuffle=False)
    sums, counts, logits = [], [], []
    for batch, rows in batches.epoch(0):
        batch = {k: v[0] for k, v in batch.items()}
        if mesh is not None:
            batch = sharding.put_batch(batch, mesh)
        out = {k: sharding.to_host(v) for k, v in steps.eval_step(state, batch).items()}
        sums.append(out["loss_sum"][:rows])
        counts.append(out["count"][:rows])
        if "logits" in out:
            logits.append(out["logits"][:rows])
    loss_sum, count = float(np.sum(np.concatenate(sums))), float(np.sum(np.concatenate(counts)))
    if state.task == "causal_lm":
        result = metrics.lm_metrics(loss_sum, int(count))
    else:
        result = {
            "loss": loss_sum / (count if count > 0 else 1.0),  # class weights may sum to less than 1
            **metrics.classification_metrics(
                np.concatenate(logits),
                prepared.eval.labels,
                state.task,
                label_names=prepared.label_names,
                threshold=args.threshold,
            ),
        }
    return {f"eval_{k}": float(v) for k, v in result.items()}


def _export(state: Any, prepared: Prepared, directory: str) -> None:
    """The model in transformers format plus the tokenizer, published by one rename; a LoRA
    run's with its adapters merged into the weights, and the adapters alone, as PEFT reads
    them, in `adapter/` inside. Every process gathers the params; process 0 writes."""
    model = state.model()
    adapted = lora.has_lora(model)
    plain = lora.merged(model) if adapted else model
    tensors = transformers_state_dict(plain)  # a collective when the params span processes
    if distributed.is_primary():
        staging = staging_dir_for(directory)
        try:
            save_transformers(plain, staging, tensors)
            prepared.tokenizer.save_pretrained(staging)
            publish(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already unless something failed
    distributed.barrier(f"export-{os.path.basename(directory)}")
    if adapted:
        lora.save_adapter(model, os.path.join(directory, "adapter"), base_model=prepared.base_model)
        distributed.barrier(f"export-{os.path.basename(directory)}-adapter")


def _plot(metrics_path: str, png: str) -> None:
    records = metrics.read_metrics(metrics_path)
    if not records:
        return
    try:
        metrics.plot_metrics(records, png)
    except ImportError:  # matplotlib comes with the "train" extra
        log.warning("%s not drawn: matplotlib is not installed (pip install 'ettin-jax[train]')", png)


def main_summary(summary: dict[str, Any]) -> str:
    best = summary["best"]
    lines = [f"{summary['status']} at step {summary['step']} of {summary['total_steps']} in {summary['output_dir']}"]
    if best["step"] is not None:
        lines.append(f"best step {best['step']}: {best['value']:.6g}")
    return "\n".join(lines)
