"""The arguments of a fine-tuning run: the one definition, from which `ettin-jax train classify|lm`
generates its flags.

Each field is a flag: `--` + its name with `_` as `-`, typed by its annotation, required when it has
no default. `metadata` carries the rest: "help"; "choices"; "tasks", the subcommands the flag
belongs to when not both; "cli": False for a field the parser does not generate; "flag", an
explicit flag name (for a bool that defaults to True); "group", a required mutually exclusive group.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from typing import Any

from ettin_jax.config import ETTIN_SIZES, PROBLEM_TYPES
from ettin_jax.errors import EttinError
from ettin_jax.train import metrics
from ettin_jax.train.optim import SCHEDULES

TRAIN_TASKS = ("classify", "lm")  # the train subcommands
DTYPES = ("float32", "bfloat16")
STRATEGIES = ("steps", "epoch")  # when to evaluate and to save
REPORTERS = ("none", "tensorboard")

# Arguments that may differ between a run and its resumption; every other one must match.
# A run may resume on another mesh or number of processes (orbax restores to the new
# shardings), and from a directory that was moved or copied.
_MAY_CHANGE_ON_RESUME = {
    "resume", "overwrite", "progress", "release_host_memory", "save_steps", "eval_steps", "log_steps",
    "save_total_limit", "mesh", "output_dir", "report_to",
}  # fmt: skip


class TrainingError(EttinError, RuntimeError):
    """A run that cannot start or go on; the message says why and what was kept."""


def _arg(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass(kw_only=True)
class TrainArgs:
    task: str = _arg(help="classify or lm", cli=False)  # from the subcommand
    model: str | None = _arg(
        None, "a transformers or ettin-jax directory, or a Hub id (default: the embedded default model)"
    )
    config: str | None = _arg(
        None,
        "train from scratch: random weights (seeded by --seed) of this shape, an Ettin size "
        f"({', '.join(ETTIN_SIZES)}; its vocabulary sized to the tokenizer's) or a config.json (or its "
        "directory); needs --tokenizer, excludes --model",
        tasks=("lm",),
    )
    tokenizer: str | None = _arg(None, "a tokenizer directory (default: the model's); needed with --config")
    train_file: str | None = _arg(None, ".csv, .jsonl or .parquet (or --dataset)")
    eval_file: str | None = _arg(None, ".csv, .jsonl or .parquet")
    dataset: str | None = _arg(
        None, "train on a dataset that datasets.load_dataset reads: a Hub id or a local directory"
    )
    dataset_config: str | None = _arg(None, "the --dataset's configuration (its name on the Hub)")
    split: str | None = _arg(None, "the --dataset's split to train on (default: train)")
    eval_split: str | None = _arg(None, "a split of --dataset to evaluate on")
    text_column: str = _arg("text", "the column of texts")
    text_pair_column: str | None = _arg(None, "a second text column (sentence pairs)", tasks=("classify",))
    label_column: str = _arg("label", "the column of labels", tasks=("classify",))
    problem_type: str | None = _arg(
        None,
        "default: inferred from the training labels (lists or comma-separated labels: multi-label; numbers, "
        "not all whole: regression; anything else, whole numbers included: single-label)",
        choices=PROBLEM_TYPES,
        tasks=("classify",),
    )
    output_dir: str = _arg(help="the run's directory: checkpoints, metrics, the final and the best model")
    epochs: int | None = _arg(None, "passes over the training data", group="length")
    max_steps: int | None = _arg(None, "optimizer steps", group="length")
    batch_size: int = _arg(8, "rows per micro-batch")
    eval_batch_size: int | None = _arg(None, "rows per evaluation batch (default: --batch-size)")
    learning_rate: float = _arg(5e-5, "the peak learning rate")
    schedule: str = _arg("linear", "the learning rate after the warmup", choices=SCHEDULES)
    warmup_ratio: float = _arg(0.0, "the fraction of the steps that warm the learning rate up from 0")
    weight_decay: float = _arg(0.0, "AdamW decay on matrices only")
    max_grad_norm: float | None = _arg(1.0, "global-norm clipping; 0 turns it off")
    grad_accum: int = _arg(1, "micro-batches per optimizer step")
    seed: int = _arg(0, "seeds the new head, the data order and dropout")
    save_steps: int = _arg(500, "steps between checkpoints (with --save-strategy steps)")
    eval_steps: int | None = _arg(None, "steps between evaluations (default: --save-steps; with --eval-strategy steps)")
    save_strategy: str = _arg("steps", "checkpoint every --save-steps steps, or at the end of every epoch",
                              choices=STRATEGIES)  # fmt: skip
    eval_strategy: str = _arg("steps", "evaluate every --eval-steps steps, or at the end of every epoch",
                              choices=STRATEGIES)  # fmt: skip
    early_stopping_patience: int | None = _arg(
        None, "stop after this many evaluations in a row without a better --metric-for-best (needs --eval-file)"
    )
    load_best_model_at_end: bool = _arg(
        False, "final/ holds the best checkpoint's model, by --metric-for-best, not the last step's (needs --eval-file)"
    )
    save_total_limit: int = _arg(2, "latest checkpoints kept (plus the best)")
    metric_for_best: str = _arg("eval_loss", "the eval metric that picks the best checkpoint")
    max_length: int = _arg(512, "longer texts are truncated (and counted)", tasks=("classify",))
    block_size: int = _arg(512, "tokens per packed training block", tasks=("lm",))
    pack: bool = _arg(
        False,
        "pack several training examples into each row of --max-length tokens, kept apart by segment ids; "
        "--batch-size then counts packed rows",
        tasks=("classify",),
    )
    class_weights: str | None = _arg(
        None,
        "weigh each class in the loss: auto (n / (classes x count), balanced) or one weight per class, "
        "comma-separated, in the label order; multi-label: each label's positive term only (pos_weight; auto: "
        "negatives / positives)",
        tasks=("classify",),
    )
    label_smoothing: float = _arg(0.0, "label smoothing of the cross-entropy (single-label and lm)")
    threshold: float = _arg(
        0.5,
        "multi-label: a label is predicted where its sigmoid exceeds this, in the eval metrics",
        tasks=("classify",),
    )
    report_to: str = _arg("none", "also log to TensorBoard event files in <output-dir>/tensorboard",
                          choices=REPORTERS)  # fmt: skip
    lora_rank: int | None = _arg(
        None, "train rank-R LoRA adapters on the --lora-targets layers (and a classifier's head), not every weight"
    )
    lora_alpha: float | None = _arg(None, "LoRA's update is scaled by alpha / rank (default: alpha = rank)")
    lora_targets: str | None = _arg(
        None,
        "a regex matched in full (as PEFT's target_modules) against module names such as model.layers.0.attn.q_proj; "
        "default: every projection of the attention and the MLP",
    )
    lora_dropout: float = _arg(0.0, "dropout on the LoRA input while training")
    dtype: str = _arg("float32", "compute dtype (the master weights stay float32)", choices=DTYPES)
    remat: bool = _arg(False, "recompute each layer in the backward pass")
    log_steps: int = _arg(10, "steps between training-loss records")
    resume: bool = _arg(False, "continue the run in --output-dir")
    overwrite: bool = _arg(False, "delete the run in --output-dir and start over")
    progress: bool = _arg(True, "no progress bar", flag="--no-progress")
    release_host_memory: bool = _arg(
        False,
        "let malloc return freed host memory to the OS (glibc's default). By default, when JAX will run on "
        "CPU, the command keeps it: each step then reuses its pages instead of faulting them in again (about "
        "1.2x faster for the 17m causal LM), at the cost of a higher resident size; see "
        "ettin_jax.compilation.keep_host_memory",
    )
    mesh: str | None = _arg(None, 'device mesh, e.g. "data=4,fsdp=2"; default: one device', cli=False)

    def __post_init__(self) -> None:
        """Every argument checked before any work: a wrong one is a `TrainingError` that names its flag."""
        if self.task not in TRAIN_TASKS:
            raise TrainingError(f"task must be one of {', '.join(TRAIN_TASKS)}, got {self.task!r}")
        _check_types(self)
        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            value = getattr(self, field.name)
            if choices and value is not None and value not in choices:
                raise TrainingError(f"{_flag(field.name)} must be one of {', '.join(choices)}, got {value!r}")
        if (self.train_file is None) == (self.dataset is None):
            raise TrainingError("give exactly one of --train-file and --dataset")
        if self.dataset is None:
            for name in ("dataset_config", "split", "eval_split"):
                if getattr(self, name) is not None:
                    raise TrainingError(f"{_flag(name)} picks from --dataset: pass --dataset too")
        if self.eval_file is not None and self.eval_split is not None:
            raise TrainingError("--eval-file and --eval-split both name an evaluation set; pass one")
        for name in ("train_file", "dataset", "output_dir", "text_column", "label_column"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise TrainingError(f"{_flag(name)} must not be empty")
        if (self.epochs is None) == (self.max_steps is None):
            raise TrainingError("give exactly one of --epochs and --max-steps")
        for name in ("epochs", "max_steps", "batch_size", "eval_batch_size", "grad_accum", "save_steps",
                     "eval_steps", "save_total_limit", "log_steps", "early_stopping_patience"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainingError(f"{_flag(name)} must be >= 1, got {value}")
        # A classified text is BOS plus at least one token; a causal-LM block predicts at least one.
        for name in ("max_length", "block_size"):
            if getattr(self, name) < 2:
                raise TrainingError(f"{_flag(name)} must be >= 2, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise TrainingError(f"--seed must lie in [0, 2**32), got {self.seed}")
        if not 0 <= self.warmup_ratio < 1:  # NaN fails every comparison
            raise TrainingError(f"--warmup-ratio must lie in [0, 1), got {self.warmup_ratio}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise TrainingError(f"--learning-rate must be a finite number > 0, got {self.learning_rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise TrainingError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if self.max_grad_norm == 0:
            self.max_grad_norm = None  # the flag's way of saying "no clipping"
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise TrainingError(
                f"--max-grad-norm must be a finite number >= 0 (0: no clipping), got {self.max_grad_norm}"
            )
        problem = "causal_lm" if self.task == "lm" else self.problem_type
        try:
            metrics.check_metric(self.metric_for_best, problem)
        except ValueError as e:
            raise TrainingError(f"--metric-for-best: {e}") from None
        if not self.metric_for_best.startswith(metrics.EVAL_PREFIX):
            self.metric_for_best = metrics.EVAL_PREFIX + self.metric_for_best  # as evaluation names it
        if self.config is not None:
            if self.task != "lm":
                raise TrainingError(
                    "--config (training from scratch) belongs to `train lm`; classify starts from --model"
                )
            if self.model is not None:
                raise TrainingError("--config trains from scratch and --model starts from a checkpoint; pass one")
            if self.tokenizer is None:
                raise TrainingError(
                    "--config (training from scratch) needs --tokenizer DIR, the tokenizer the new model reads"
                )
            if not self.config.strip():
                raise TrainingError("--config must not be empty")
        if self.tokenizer is not None and not self.tokenizer.strip():
            raise TrainingError("--tokenizer must not be empty")
        for name in ("early_stopping_patience", "load_best_model_at_end"):
            if getattr(self, name) and self.eval_file is None and self.eval_split is None:
                raise TrainingError(f"{_flag(name)} picks by --metric-for-best on the evaluation set: pass --eval-file")
        if not 0 <= self.label_smoothing < 1:
            raise TrainingError(f"--label-smoothing must lie in [0, 1), got {self.label_smoothing}")
        if not 0 < self.threshold < 1:
            raise TrainingError(f"--threshold must lie in (0, 1), got {self.threshold}")
        if self.class_weights is not None and self.class_weights.strip() != "auto":
            parse_class_weights(self.class_weights)  # numbers, checked now; their count once the labels are known
        self._check_lora()
        if self.resume and self.overwrite:
            raise TrainingError("--resume and --overwrite contradict each other; pass one")

    def _check_lora(self) -> None:
        if self.lora_rank is None:
            given = [n for n in ("lora_alpha", "lora_targets") if getattr(self, n) is not None]
            given += ["lora_dropout"] if self.lora_dropout else []
            if given:
                what = "is a LoRA setting" if len(given) == 1 else "are LoRA settings"
                raise TrainingError(f"{', '.join(map(_flag, given))} {what}: pass --lora-rank too")
            return
        if self.lora_rank < 1:
            raise TrainingError(f"--lora-rank must be >= 1, got {self.lora_rank}")
        if self.config is not None:
            raise TrainingError(
                "--lora-rank adapts a trained --model; a model trained from scratch (--config) trains in full"
            )
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise TrainingError(f"--lora-alpha must be a finite number > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise TrainingError(f"--lora-dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.lora_targets is not None:
            try:
                re.compile(self.lora_targets)
            except re.error as e:
                raise TrainingError(f"--lora-targets {self.lora_targets!r} is not a regular expression: {e}") from None

    def identity(self) -> dict[str, Any]:
        """The arguments that define the run, as saved in run.json: a resume must match them."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _MAY_CHANGE_ON_RESUME}


def parse_class_weights(text: str) -> list[float]:
    """--class-weights w1,w2,...: each a finite number >= 0, not all 0."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise TrainingError(
            f"--class-weights must be auto or comma-separated numbers, one per class, got {text!r}"
        ) from None
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise TrainingError(f"--class-weights must be finite numbers >= 0, not all 0, got {text!r}")
    return weights


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _check_types(args: TrainArgs) -> None:
    """Each field's value of its annotated type (from Python, nothing else checks it): an int
    field takes an int, a float field an int or a float, a str field a str; None where allowed."""
    for name, hint in typing.get_type_hints(TrainArgs).items():
        value = getattr(args, name)
        kinds = typing.get_args(hint) or (hint,)
        if str in kinds and isinstance(value, os.PathLike):
            value = os.fspath(value)  # a pathlib.Path for a file or directory: run.json saves a str
            setattr(args, name, value)
        if value is None and type(None) in kinds:
            continue
        if bool in kinds:
            ok = isinstance(value, bool)
        elif float in kinds:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif int in kinds:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            wanted = {bool: "true or false", float: "a number", int: "an integer", str: "a string"}
            kind = next((k for k in (bool, float, int, str) if k in kinds), str)
            raise TrainingError(f"{_flag(name)} must be {wanted[kind]}, got {value!r}")
