"""Pure, jitted training and evaluation steps.

A `TrainState` holds the float32 master params as a nested dict (the model's `nnx.Param`
state), the optax state, the step and an RNG key; the model's structure (`graphdef`) and the
optimizer ride along as static fields, as in Flax's own `TrainState`. The compute dtype is the
model's `dtype`, so a model built with `dtype=jnp.bfloat16, param_dtype=jnp.float32` trains in
bfloat16 on float32 master weights.

A batch holds `grad_accum` micro-batches stacked on a leading axis: `input_ids` and
`attention_mask` (K, B, T) and `labels` (K, B, ...). The step sums the loss over every
micro-batch, then divides by the number of items (tokens for the causal LM, labels for the
classifiers), so accumulating K micro-batches gives the gradient of one batch K times larger.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from ettin_jax import compilation, sharding
from ettin_jax.config import ConfigError
from ettin_jax.losses import row_losses
from ettin_jax.modeling import ModernBertDecoderForCausalLM
from ettin_jax.quantization import QuantizationError

Array = jax.Array


@struct.dataclass
class TrainState:
    step: Array  # optimizer updates done, int32
    params: dict  # nested dict of float32 arrays: the params that train (all of them, unless LoRA)
    frozen: dict  # the params that do not (the base model under LoRA); not in the checkpoint
    opt_state: Any
    rng: Array  # uint32[2] key; step s uses fold_in(rng, s)
    rest: Any  # the model's other state (dropout RNG streams), reseeded every step; not saved
    class_weights: Array | None  # (L,) the loss's weight of each class (`losses.row_losses`), or None
    graphdef: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    task: str = struct.field(pytree_node=False)
    label_smoothing: float = struct.field(pytree_node=False, default=0.0)

    def model(self) -> nnx.Module:
        """The NNX model with this state's params (for evaluation and export)."""
        return nnx.merge(self.graphdef, self.params, self.frozen, self.rest)

    def checkpoint(self) -> dict[str, Any]:
        """What a checkpoint holds: everything but the static fields, the frozen params (the
        run's --model has them) and the dropout streams."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}

    def restore(self, saved: dict[str, Any]) -> TrainState:
        return self.replace(**saved)


def opt_state_shardings(tx: optax.GradientTransformation, params: dict, mesh: Any) -> Any:
    """Shardings for `tx.init(params)`: each moment like its param, counters replicated.
    `params` may be arrays or ShapeDtypeStructs, each with its sharding."""
    return optax.tree_map_params(
        tx,
        lambda _, param_sharding: param_sharding,
        jax.eval_shape(tx.init, params),
        jax.tree.map(lambda x: x.sharding, params),
        transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def task_of(model: nnx.Module) -> str:
    """'causal_lm' for the LM, the config's problem type for a classifier."""
    if isinstance(model, ModernBertDecoderForCausalLM):
        return "causal_lm"
    kind = model.config.problem_type
    if kind is None:
        raise ConfigError("the classifier's config has no problem_type; set it before training")
    return kind


def create_train_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    seed: int = 0,
    trainable: Any = nnx.Param,
    *,
    class_weights: Any = None,
    label_smoothing: float = 0.0,
) -> TrainState:
    """The state of a model about to train: the params that `trainable` (an nnx filter) selects
    train, with optimizer state for them alone; the other params stay as they are (LoRA:
    `ettin_jax.train.lora.TRAINABLE`). `class_weights` and `label_smoothing` shape the loss, in
    training and evaluation alike (`ettin_jax.losses.row_losses`). On a sharded model
    (`ettin_jax.sharding`) the optimizer's moments are sharded like their params, and the step,
    RNG and class weights replicated."""
    if model.config.quantization is not None:
        raise QuantizationError(
            f"the model has {model.config.quantization} weights, which are for inference; train the float "
            "model (load it without quantization)"
        )
    graphdef, params, frozen, rest = nnx.split(model, trainable, nnx.Param, ...)
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    step, rng = jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed)
    weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)
    mesh = sharding.mesh_of(params)
    if mesh is None:
        opt_state = tx.init(params)
    else:
        opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, mesh))(params)
        replicated = NamedSharding(mesh, PartitionSpec())
        step, rng = sharding.put(step, replicated), sharding.put(rng, replicated)
        weights = None if weights is None else sharding.put(weights, replicated)
    return TrainState(
        step=step,
        params=params,
        frozen=frozen,
        opt_state=opt_state,
        rng=rng,
        rest=rest,
        class_weights=weights,
        graphdef=graphdef,
        tx=tx,
        task=task_of(model),
        label_smoothing=label_smoothing,
    )


# What a packed batch adds to `input_ids` and `attention_mask` (train.data): each token's segment
# and its position in it; for packed classifier rows, where each example ends.
_PACKED = ("segment_ids", "position_ids", "pool_positions")


def _forward(model: nnx.Module, batch: dict[str, Array], deterministic: bool) -> Array:
    packed = {name: batch[name] for name in _PACKED if name in batch}
    return model(batch["input_ids"], batch["attention_mask"], deterministic=deterministic, **packed).logits


def _row_losses(state: TrainState, logits: Array, batch: dict[str, Array]) -> tuple[Array, Array]:
    """Per-item loss sums and counts of a micro-batch: per row, or per slot of packed classifier
    rows (logits (B, S, L)), where an empty slot counts for nothing."""
    options = dict(class_weights=state.class_weights, label_smoothing=state.label_smoothing)
    labels = batch["labels"]
    if "slots" not in batch:
        return row_losses(state.task, logits, labels, **options)
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1, *labels.shape[2:])  # slots as rows
    sums, counts = row_losses(state.task, logits, labels, **options)
    slots = batch["slots"].reshape(-1)
    return sums * slots, counts * slots


def seeded(rest: Any, rng: Array) -> Any:
    """The model's RNG streams (dropout) with fresh keys from `rng`: stream i gets fold_in(rng, i)
    and a zero count, so a step's dropout masks depend on its key alone."""
    leaves, treedef = jax.tree.flatten(rest)
    out = []
    for i, leaf in enumerate(leaves):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            out.append(jax.random.wrap_key_data(jax.random.fold_in(rng, i), impl=jax.random.key_impl(leaf)))
        else:
            out.append(jnp.zeros_like(leaf))
    return jax.tree.unflatten(treedef, out)


def loss_sum(
    params: dict, state: TrainState, batch: dict[str, Array], rng: Array, deterministic: bool = False
) -> tuple[Array, Array]:
    """(summed loss, item count) of one micro-batch with `params` for the state's trainable
    params; differentiable in `params`."""
    rest = state.rest if deterministic else seeded(state.rest, rng)
    model = nnx.merge(state.graphdef, params, state.frozen, rest)
    if not deterministic:  # layers that take no `deterministic` argument (LoRA's input dropout) train too
        model = nnx.view(model, deterministic=False, raise_if_not_found=False)
    sums, counts = _row_losses(state, _forward(model, batch, deterministic), batch)
    return jnp.sum(sums), jnp.sum(counts)


def gradients(state: TrainState, batch: dict[str, Array], rng: Array) -> tuple[Array, Array, dict]:
    """Summed loss, item count and summed gradients over the K stacked micro-batches."""
    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def micro(carry: tuple, inputs: tuple) -> tuple:
        total, count, grads = carry
        i, mb = inputs
        (s, n), g = grad_fn(state.params, state, mb, jax.random.fold_in(rng, i))
        return (total + s, count + n, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    steps = batch["input_ids"].shape[0]
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    if steps == 1:
        carry, _ = micro(init, (0, jax.tree.map(lambda x: x[0], batch)))
    else:
        carry, _ = jax.lax.scan(micro, init, (jnp.arange(steps), batch))
    return carry


def _train_step(state: TrainState, batch: dict[str, Array], rng: Array) -> tuple[TrainState, dict[str, Array]]:
    total, count, grads = gradients(state, batch, rng)
    count = jnp.where(count > 0, count, 1.0)  # every label ignored: loss 0, no update from the data
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": total / count,
        "grad_norm": optax.global_norm(grads),
        "items": count,
        "tokens": jnp.sum(batch["attention_mask"]),  # real tokens, on every process (the batch is global)
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# Jitted with the XLA:CPU options that make these steps faster on CPU (ettin_jax.compilation).
_train_step_program = compilation.jit(_train_step, donate_argnums=(0,))


def train_step(state: TrainState, batch: dict[str, Array], rng: Array) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer step, jitted: (new state, {"loss", "grad_norm", "items", "tokens"}). `rng` is the
    step's dropout key; the trainer passes fold_in(state.rng, state.step). The state is donated:
    its buffers are reused for the new one, so do not use `state` afterwards."""
    with sharding.activate(sharding.mesh_of(state.params)):
        return _train_step_program(state, batch, rng)


def eval_step(state: TrainState, batch: dict[str, Array]) -> dict[str, Array]:
    """Per-row loss sums and counts, and the logits of classifiers ((B, L)); no gradient. Takes
    one micro-batch: `input_ids` (B, T). Jitted."""
    with sharding.activate(sharding.mesh_of(state.params)):
        return _eval_step_program(state, batch)


def _eval_step(state: TrainState, batch: dict[str, Array]) -> dict[str, Array]:
    model = state.model()
    logits = _forward(model, batch, deterministic=True)
    sums, counts = _row_losses(state, logits, batch)
    out = {"loss_sum": sums, "count": counts}
    if state.task != "causal_lm":
        out["logits"] = logits.astype(jnp.float32)
    return out


_eval_step_program = compilation.jit(_eval_step)
