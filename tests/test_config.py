"""`ModernBertDecoderConfig` against transformers' config of the same name."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import transformers
from conftest import TINY, tiny_config

from ettin_jax.config import ConfigError, ModernBertDecoderConfig

SIZES = ("17m", "32m", "68m", "150m", "400m", "1b")


def reference(data: dict) -> transformers.ModernBertDecoderConfig:
    """transformers' reading of `data` (deep-copied: transformers fills nested rope dicts in place)."""
    data = copy.deepcopy(data)
    data.pop("model_type", None)
    return transformers.ModernBertDecoderConfig(**data)


def thetas(ref: transformers.ModernBertDecoderConfig) -> tuple[float, float]:
    return (
        ref.rope_parameters["full_attention"]["rope_theta"],
        ref.rope_parameters["sliding_attention"]["rope_theta"],
    )


# ---- 1. rope spellings -----------------------------------------------------------------------

ROPE_SPELLINGS = {
    "rope_parameters_per_type": {
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 123_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 4_500.0},
        }
    },
    "rope_parameters_sliding_only": {
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 7_000.0}}
    },
    "rope_parameters_beat_legacy": {
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1_000.0},
            "sliding_attention": {"rope_type": "default"},
        },
        "global_rope_theta": 321_000.0,
        "local_rope_theta": 5_400.0,
    },
    "legacy_global_local": {"global_rope_theta": 321_000.0, "local_rope_theta": 5_400.0},
    "legacy_global_only": {"global_rope_theta": 321_000.0},
    "legacy_beats_plain": {"rope_theta": 777_000.0, "global_rope_theta": 50_000.0},
    # transformers ignores a bare rope_theta for this model, and so do we.
    "plain_rope_theta": {"rope_theta": 777_000.0},
    "rope_scaling_default_with_theta": {"rope_scaling": {"rope_type": "default", "rope_theta": 500.0}},
    "defaults": {},
}


@pytest.mark.parametrize("spelling", list(ROPE_SPELLINGS.values()), ids=list(ROPE_SPELLINGS))
def test_rope_spellings_match_transformers(spelling):
    data = {**TINY, **spelling}
    ref = reference(data)
    ours = ModernBertDecoderConfig.from_dict(copy.deepcopy(data))
    assert (ours.global_rope_theta, ours.local_rope_theta) == thetas(ref)
    assert ours.rope_parameters == ref.rope_parameters
    for layer, kind in enumerate(ref.layer_types):
        assert ours.rope_theta(layer) == ref.rope_parameters[kind]["rope_theta"]


def test_rope_parameters_one_dict_for_all_layers():
    # transformers' strict config rejects this older spelling; ours applies it to both layer types.
    ours = ModernBertDecoderConfig.from_dict({**TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 99.0}})
    assert (ours.global_rope_theta, ours.local_rope_theta) == (99.0, 99.0)


@pytest.mark.parametrize(
    "spelling",
    [
        {"global_rope_theta": 321_000.0, "local_rope_theta": 5_400.0},
        ROPE_SPELLINGS["rope_parameters_per_type"],
        {},
    ],
    ids=["legacy", "rope_parameters", "defaults"],
)
def test_legacy_rope_uses_global_theta_everywhere(spelling):
    data = {**TINY, **spelling}
    plain = ModernBertDecoderConfig.from_dict(copy.deepcopy(data))
    legacy = ModernBertDecoderConfig.from_dict(copy.deepcopy(data), legacy_rope=True)
    assert plain.local_rope_theta != plain.global_rope_theta
    assert legacy.global_rope_theta == plain.global_rope_theta
    assert legacy.local_rope_theta == plain.global_rope_theta
    assert {legacy.rope_theta(i) for i in range(legacy.num_hidden_layers)} == {plain.global_rope_theta}


# ---- 2. layer pattern ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        {},
        {"global_attn_every_n_layers": 1},
        {"global_attn_every_n_layers": 2},
        {"global_attn_every_n_layers": 3, "num_hidden_layers": 7},
        {"global_attn_every_n_layers": 4, "num_hidden_layers": 9},
        {"layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]},
        {"layer_types": ["sliding_attention"] * 4, "global_attn_every_n_layers": 2},
    ],
    ids=["default", "every_1", "every_2", "every_3_of_7", "every_4_of_9", "explicit", "explicit_beats_every_n"],
)
def test_layer_pattern_matches_transformers(pattern):
    data = {**TINY, **pattern}
    ref = reference(data)
    ours = ModernBertDecoderConfig.from_dict(data)
    assert ours.layer_types == tuple(ref.layer_types)
    assert [ours.is_sliding(i) for i in range(ours.num_hidden_layers)] == [
        kind == "sliding_attention" for kind in ref.layer_types
    ]


def test_constructor_default_pattern_matches_transformers():
    ours = ModernBertDecoderConfig(**{**TINY, "num_hidden_layers": 8})
    assert ours.layer_types == tuple(tiny_config(num_hidden_layers=8).layer_types)
    assert ours.layer_types[:4] == ("full_attention", "sliding_attention", "sliding_attention", "full_attention")


# ---- 3. serialisation ------------------------------------------------------------------------

ROUND_TRIP = {
    "tiny": {},
    "labels": {"id2label": {"0": "neg", "1": "neutral", "2": "pos"}, "problem_type": "single_label_classification"},
    "eos_list": {"eos_token_id": [2, 3]},
    "thetas_untied": {
        "global_rope_theta": 321_000.0,
        "local_rope_theta": 5_400.0,
        "tie_word_embeddings": False,
        "global_attn_every_n_layers": 2,
    },
    "training_window": {"training_window": True, "local_attention": 16},
}


@pytest.fixture(params=list(ROUND_TRIP.values()), ids=list(ROUND_TRIP))
def ours(request) -> ModernBertDecoderConfig:
    return ModernBertDecoderConfig.from_dict({**TINY, **request.param})


def test_to_dict_reads_in_transformers(ours):
    ref = transformers.ModernBertDecoderConfig.from_dict(ours.to_dict())
    assert ref.vocab_size == ours.vocab_size
    assert tuple(ref.layer_types) == ours.layer_types
    assert ref.rope_parameters == ours.rope_parameters
    assert ref.sliding_window == ours.local_attention // 2
    assert ref.id2label == ours.id2label
    assert ref.tie_word_embeddings == ours.tie_word_embeddings
    expected_eos = list(ours.eos_token_id) if isinstance(ours.eos_token_id, tuple) else ours.eos_token_id
    assert ref.eos_token_id == expected_eos
    assert ref.problem_type == ours.problem_type


def test_to_dict_round_trips(ours):
    data = ours.to_dict()
    json.dumps(data)  # config.json material
    back = ModernBertDecoderConfig.from_dict(data)
    assert back == ours
    assert hash(back) == hash(ours)


def test_from_pretrained_reads_transformers_save(ours, tmp_path):
    transformers.ModernBertDecoderConfig.from_dict(ours.to_dict()).save_pretrained(tmp_path)
    # transformers keeps the keys it does not know, training_window included.
    assert ModernBertDecoderConfig.from_pretrained(tmp_path) == ours
    assert ModernBertDecoderConfig.from_pretrained(tmp_path / "config.json") == ours


@pytest.mark.parametrize(
    "overrides",
    [{}, ROPE_SPELLINGS["rope_parameters_per_type"], {"global_attn_every_n_layers": 2, "num_labels": 3}],
    ids=["tiny", "rope_parameters", "every_2_labels"],
)
def test_from_pretrained_equals_from_dict(overrides, tmp_path):
    data = {**TINY, **overrides}
    reference(data).save_pretrained(tmp_path)
    loaded = ModernBertDecoderConfig.from_pretrained(tmp_path)
    assert loaded == ModernBertDecoderConfig.from_dict(copy.deepcopy(data))
    legacy = ModernBertDecoderConfig.from_pretrained(tmp_path, legacy_rope=True)
    assert legacy.local_rope_theta == loaded.global_rope_theta
    assert ModernBertDecoderConfig.from_pretrained(tmp_path, vocab_size=256).vocab_size == 256


def test_save_loads_in_transformers(ours, tmp_path):
    ours.save(tmp_path, architecture="ModernBertDecoderForCausalLM")
    ref = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(ref, transformers.ModernBertDecoderConfig)
    assert ref.architectures == ["ModernBertDecoderForCausalLM"]
    assert tuple(ref.layer_types) == ours.layer_types
    assert ref.rope_parameters == ours.rope_parameters
    assert ref.id2label == ours.id2label
    assert ref.hidden_size == ours.hidden_size
    assert ref.sliding_window == ours.local_attention // 2
    assert ModernBertDecoderConfig.from_pretrained(tmp_path) == ours


# ---- 4. errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_attention_heads": 5}, r"hidden_size \(64\) is not divisible by num_attention_heads \(5\)"),
        (
            {"layer_types": ["full_attention", "chunked_attention", "sliding_attention", "full_attention"]},
            r"layer_types\[1\] is 'chunked_attention'",
        ),
        (
            {"layer_types": ["full_attention", "sliding_attention"]},
            r"layer_types has 2 entries but num_hidden_layers is 4",
        ),
        ({"model_type": "bert"}, r"model_type is 'bert'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, r"rope_scaling asks for rope_type 'linear'"),
        (
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 2.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                }
            },
            r"rope_parameters\['full_attention'\] asks for rope_type 'yarn'",
        ),
        ({"problem_type": "ranking"}, r"problem_type 'ranking' is not one of"),
        ({"hidden_activation": "mish"}, r"hidden_activation 'mish' is not supported"),
        ({"classifier_activation": "tanh"}, r"classifier_activation 'tanh' is not supported"),
    ],
    ids=[
        "heads",
        "unknown_layer_type",
        "layer_types_length",
        "model_type",
        "rope_scaling_linear",
        "yarn",
        "problem_type",
        "hidden_activation",
        "classifier_activation",
    ],
)
def test_invalid_config_raises(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ModernBertDecoderConfig.from_dict({**TINY, **overrides})


def test_unknown_ettin_size():
    with pytest.raises(ConfigError, match=r"unknown Ettin size '3b'"):
        ModernBertDecoderConfig.ettin("3b")


def test_from_pretrained_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        ModernBertDecoderConfig.from_pretrained(tmp_path)


def test_from_pretrained_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        ModernBertDecoderConfig.from_pretrained(tmp_path)


# ---- 5. Ettin presets ------------------------------------------------------------------------

# The paper's table (arXiv 2507.11412), in millions. These are ModernBertDecoderModel counts:
# embeddings and layers, without the causal-LM head (dense + norm) and the decoder's bias.
TABLE_MILLIONS = {"17m": 16.8, "32m": 31.9, "68m": 68.1, "150m": 149.0, "400m": 394.8, "1b": 1028.1}


def analytic_base_params(cfg: ModernBertDecoderConfig) -> int:
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    embeddings = cfg.vocab_size * h + h  # token embeddings + LayerNorm (no bias)
    layer = 4 * h * h + 3 * i * h + 2 * h  # q, k, v, Wo; Wi (2i x h), Wo; attn_norm, mlp_norm
    return embeddings + n * layer - h + h  # layer 0 has no attn_norm; final_norm


def unique_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("size", SIZES)
def test_ettin_preset_param_count(size):
    cfg = ModernBertDecoderConfig.ettin(size)
    assert cfg.tie_word_embeddings
    ref = transformers.ModernBertDecoderConfig.from_dict(cfg.to_dict())
    with torch.device("meta"):
        base = transformers.ModernBertDecoderModel(ref)
        causal = transformers.ModernBertDecoderForCausalLM(ref)
    assert causal.decoder.weight is causal.model.embeddings.tok_embeddings.weight
    n_base = unique_params(base)
    assert n_base == analytic_base_params(cfg)
    assert round(n_base / 1e6, 1) == TABLE_MILLIONS[size]
    h = cfg.hidden_size
    # The LM head adds dense (h x h, no bias) + LayerNorm (no bias) + decoder bias; the tied
    # decoder weight is the embedding, counted once.
    assert unique_params(causal) == n_base + h * h + h + cfg.vocab_size


def test_ettin_overrides():
    cfg = ModernBertDecoderConfig.ettin("68m", vocab_size=1024)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (19, 512, 768, 8)
    assert cfg.vocab_size == 1024


# ---- 6. replace, hashing, freezing -----------------------------------------------------------


def test_replace_num_labels():
    cfg = ModernBertDecoderConfig(**TINY).replace(num_labels=3)
    assert cfg.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert cfg.label2id == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    assert cfg.num_labels == 3
    assert cfg.id2label == tiny_config(num_labels=3).id2label


def test_replace_unknown_field():
    with pytest.raises(ConfigError, match="unknown config field"):
        ModernBertDecoderConfig(**TINY).replace(num_layers=3)


def test_hashable_and_frozen():
    a = ModernBertDecoderConfig(**TINY)
    b = ModernBertDecoderConfig.from_dict(dict(TINY))
    cache = {a: "compiled"}
    assert cache[b] == "compiled"
    assert a.replace(vocab_size=256) not in cache
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.vocab_size = 256  # type: ignore[misc]
    assert a.vocab_size == TINY["vocab_size"]
