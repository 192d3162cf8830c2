"""Training steps against transformers + torch on the same weights, in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from helpers import random_ids, to_numpy

from ettin_jax import ModernBertDecoderForCausalLM, ModernBertDecoderForSequenceClassification
from ettin_jax.convert.keys import to_key
from ettin_jax.losses import row_losses
from ettin_jax.train.optim import OptimizerConfig, decay_mask, learning_rate_schedule, make_optimizer
from ettin_jax.train.steps import create_train_state, loss_sum, train_step

PROBLEMS = {
    "single_label_classification": dict(num_labels=3),
    "multi_label_classification": dict(num_labels=3),
    "regression": dict(num_labels=1),
}


def _labels(kind: str, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "causal_lm":
        return None
    if kind == "single_label_classification":
        return rng.integers(0, 3, batch).astype(np.int32)
    if kind == "multi_label_classification":
        return rng.integers(0, 2, (batch, 3)).astype(np.float32)
    return rng.normal(size=batch).astype(np.float32)


def _models(saved, kind: str):
    if kind == "causal_lm":
        theirs, directory = saved("causal")
        return theirs, ModernBertDecoderForCausalLM.from_pretrained(directory)
    theirs, directory = saved("classify", problem_type=kind, **PROBLEMS[kind])
    return theirs, ModernBertDecoderForSequenceClassification.from_pretrained(directory)


def _batch(kind: str, batch: int = 3, length: int = 12) -> dict[str, np.ndarray]:
    ids = random_ids(batch, length, seed=5)
    mask = np.ones_like(ids)
    mask[0, -3:] = 0  # one right-padded row
    ids[0, -3:] = 0
    labels = _labels(kind, batch)
    if labels is None:
        labels = np.where(mask == 1, ids, -100).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _torch_loss(model, batch):
    return model(
        input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
        attention_mask=torch.tensor(batch["attention_mask"]),
        labels=torch.tensor(batch["labels"], dtype=torch.long if batch["labels"].dtype == np.int32 else None),
    ).loss


def _torch_params(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _flat(tree) -> dict[tuple, np.ndarray]:
    return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): np.asarray(x) for path, x in
            jax.tree_util.tree_flatten_with_path(tree)[0]}  # fmt: skip


def _compare(ours: dict, theirs: dict[str, torch.Tensor], tol: float, what: str) -> float:
    flat = _flat(ours)
    assert len(flat) == len(theirs), (sorted(flat), sorted(theirs))
    worst = 0.0
    for path, value in flat.items():
        key, transpose = to_key(path)
        expected = to_numpy(theirs[key])
        expected = expected.T if transpose else expected
        diff = float(np.max(np.abs(value - expected)))
        assert diff <= tol, f"{what} of {key}: max |diff| {diff}"
        worst = max(worst, diff)
    return worst


@pytest.mark.parametrize("kind", ["causal_lm", *PROBLEMS])
def test_gradients_match_torch(saved, kind):
    theirs, ours = _models(saved, kind)
    batch = _batch(kind)
    state = create_train_state(ours, make_optimizer(OptimizerConfig()))
    grad_fn = jax.grad(lambda p: (lambda s, n: s / n)(*loss_sum(p, state, batch, None, True)))
    grads = grad_fn(state.params)
    loss = _torch_loss(theirs, batch)
    loss.backward()
    worst = _compare(grads, {k: p.grad for k, p in _torch_params(theirs).items()}, 1e-5, "gradient")
    assert worst > 0 or kind != "causal_lm"  # the comparison saw real numbers


def test_row_losses_are_transformers_losses(saved):
    theirs, ours = _models(saved, "causal_lm")
    batch = _batch("causal_lm")
    logits = ours(batch["input_ids"], batch["attention_mask"]).logits
    sums, counts = row_losses("causal_lm", logits, jnp.asarray(batch["labels"]))
    assert counts.tolist() == [8.0, 11.0, 11.0]  # 9 real tokens predict 8; padding is ignored
    np.testing.assert_allclose(float(sums.sum() / counts.sum()), float(_torch_loss(theirs, batch).detach()), rtol=1e-5)


def _torch_adamw(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = list(model.parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=lr, betas=(0.9, 0.999), eps=1e-8,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["causal_lm", "single_label_classification"])
def test_adamw_steps_match_torch(saved, kind):
    """Three AdamW steps (so bias correction and both moments matter), each side computing its
    own gradients, end at the same params."""
    theirs, ours = _models(saved, kind)
    theirs.train()
    batch = _batch(kind)
    lr, decay = 1e-3, 0.1
    config = OptimizerConfig(learning_rate=lr, schedule="constant", weight_decay=decay, max_grad_norm=None)
    state = create_train_state(ours, make_optimizer(config))
    before = _flat(state.params)
    optimizer = _torch_adamw(theirs, lr, decay)
    stacked = {k: v[None] for k, v in batch.items()}
    for _ in range(3):
        state, _ = train_step(state, stacked, jax.random.PRNGKey(0))
        loss = _torch_loss(theirs, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    _compare(state.params, _torch_params(theirs), 1e-5, "updated param")
    moved = max(float(np.max(np.abs(_flat(state.params)[p] - before[p]))) for p in before)
    assert moved > 1e-3  # the steps changed the params, so the comparison means something


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules_match_transformers(schedule):
    import transformers

    make = {
        "constant": transformers.get_constant_schedule_with_warmup,
        "linear": transformers.get_linear_schedule_with_warmup,
        "cosine": transformers.get_cosine_schedule_with_warmup,
    }[schedule]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    kwargs = {} if schedule == "constant" else {"num_training_steps": 50}
    torch_schedule = make(optimizer, num_warmup_steps=10, **kwargs)
    ours = learning_rate_schedule(
        OptimizerConfig(learning_rate=2e-3, schedule=schedule, warmup_steps=10, total_steps=50)
    )
    expected = []
    for _ in range(50):
        expected.append(torch_schedule.get_last_lr()[0])
        optimizer.step()
        torch_schedule.step()
    np.testing.assert_allclose([float(ours(s)) for s in range(50)], expected, rtol=1e-5, atol=1e-10)


def test_weight_decay_skips_norms_and_biases():
    model = ModernBertDecoderForCausalLM(_tiny(attention_bias=True, mlp_bias=True))
    state = create_train_state(model, make_optimizer(OptimizerConfig()))
    mask = _flat(decay_mask(state.params))
    decayed = {p[-1] for p, m in mask.items() if m}
    kept = {p[-1] for p, m in mask.items() if not m}
    assert decayed == {"kernel", "embedding"}
    assert kept == {"scale", "bias"}


def _tiny(**overrides):
    from helpers import TINY

    from ettin_jax.config import ModernBertDecoderConfig

    return ModernBertDecoderConfig.from_dict({**TINY, **overrides})


def test_gradient_accumulation_equals_one_big_batch(saved):
    """Two micro-batches of 2 rows give the step of one batch of 4 rows: the loss is averaged
    over all tokens of the step (rows hold different numbers of real tokens)."""
    _, directory = saved("causal")
    batch = _batch("causal_lm", batch=4)
    batch["attention_mask"][3, -6:] = 0
    batch["labels"][3, -6:] = -100
    results = []
    for k in (1, 2):
        # Plain SGD with rate 1, so the params moved by exactly the gradient (Adam's first step
        # would amplify float rounding in tiny gradients up to the learning rate).
        state = create_train_state(ModernBertDecoderForCausalLM.from_pretrained(directory), optax.sgd(1.0))
        stacked = {n: v.reshape(k, 4 // k, *v.shape[1:]) for n, v in batch.items()}
        state, metrics = train_step(state, stacked, jax.random.PRNGKey(0))
        results.append((float(metrics["loss"]), float(metrics["items"]), _flat(state.params)))
    (loss1, items1, params1), (loss2, items2, params2) = results
    assert items1 == items2 == 8 + 11 + 11 + 5
    np.testing.assert_allclose(loss1, loss2, rtol=1e-6)
    for path in params1:
        # Within float32 rounding: the two sum the same terms in a different order.
        np.testing.assert_allclose(params1[path], params2[path], atol=1e-6, err_msg=str(path))


def test_remat_gives_the_same_gradients(saved):
    _, directory = saved("causal")
    batch = _batch("causal_lm")
    grads = []
    for remat in (False, True):
        model = ModernBertDecoderForCausalLM.from_pretrained(directory)
        model.model.remat = remat
        state = create_train_state(model, make_optimizer(OptimizerConfig()))
        grad = jax.grad(lambda p, s=state: loss_sum(p, s, batch, None, True)[0])
        grads.append(_flat(grad(state.params)))
    for path in grads[0]:
        np.testing.assert_allclose(grads[0][path], grads[1][path], atol=1e-6, err_msg=str(path))


def test_bfloat16_compute_keeps_float32_master_weights(saved):
    _, directory = saved("causal")
    batch = {k: v[None] for k, v in _batch("causal_lm").items()}
    losses = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = ModernBertDecoderForCausalLM.from_pretrained(directory, dtype=dtype, param_dtype=jnp.float32)
        state = create_train_state(model, make_optimizer(OptimizerConfig(learning_rate=1e-3)))
        state, metrics = train_step(state, batch, jax.random.PRNGKey(0))
        assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
        losses[dtype] = float(metrics["loss"])
    assert losses[jnp.float32] != losses[jnp.bfloat16]  # bfloat16 really computed
    np.testing.assert_allclose(losses[jnp.bfloat16], losses[jnp.float32], rtol=2e-2)


def test_dropout_uses_the_step_rng(saved):
    """With dropout on, the same rng gives the same step and another rng a different one."""
    _, directory = saved("causal", embedding_dropout=0.2, mlp_dropout=0.2)
    batch = {k: v[None] for k, v in _batch("causal_lm").items()}
    losses = []
    for seed in (0, 0, 1):
        model = ModernBertDecoderForCausalLM.from_pretrained(directory)
        state = create_train_state(model, make_optimizer(OptimizerConfig()))
        losses.append(float(train_step(state, batch, jax.random.PRNGKey(seed))[1]["loss"]))
    assert losses[0] == losses[1] != losses[2]
