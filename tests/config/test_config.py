"""Config presets and the clear errors of invalid combinations."""

import dataclasses

import pytest

from mmcap.config import (
    ConfigError,
    DecoderConfig,
    ParallelConfig,
    PrecisionConfig,
    get_preset,
    list_presets,
    validate_layout,
)

PAPER = ["florence-2-base", "florence-2-large", "florence-gemma-2-large", "florence-gemma-2-xlarge"]


def test_all_presets_exist_and_validate():
    assert set(PAPER + ["debug-florence", "debug-gemma"]) <= set(list_presets())
    for name in list_presets():
        cfg = get_preset(name)
        validate_layout(cfg, ParallelConfig())


def test_gemma_preset_shapes_follow_public_configs():
    d9 = get_preset("florence-gemma-2-xlarge").decoder
    assert (d9.num_layers, d9.hidden_size, d9.ffn_hidden_size) == (42, 3584, 14336)
    assert (d9.num_attention_heads, d9.num_kv_heads, d9.head_dim) == (16, 8, 256)
    d2 = get_preset("florence-gemma-2-large").decoder
    assert (d2.num_layers, d2.hidden_size, d2.num_attention_heads, d2.num_kv_heads) == (
        26,
        2304,
        8,
        4,
    )
    for d in (d2, d9):
        assert (d.attn_logit_softcap, d.final_logit_softcap, d.sliding_window) == (50.0, 30.0, 4096)
        assert d.query_pre_attn_scalar == 256 and d.vocab_size == 256000
        assert d.encoder_hidden_size == 1024 and d.gated_cross_attention
        # HF numbering: layer 0 slides, layer 1 is global.
        assert d.resolved_layer_types[:2] == ("sliding_attention", "full_attention")
    assert get_preset("florence-2-large").decoder.vocab_size == 257024
    assert get_preset("florence-gemma-2-large").vision.num_image_tokens == 50
    v768 = dataclasses.replace(get_preset("florence-2-large").vision, image_size=768)
    assert v768.num_image_tokens == 577


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="unknown preset 'gemma-7b'.*florence-gemma-2-xlarge"):
        get_preset("gemma-7b")


@pytest.mark.parametrize(
    "tp,match",
    [
        (3, "num_attention_heads"),  # 8 heads
        (8, "num_kv_heads"),  # 8 heads but 4 kv heads
    ],
)
def test_tp_must_divide_heads(tp, match):
    cfg = get_preset("florence-gemma-2-large")
    with pytest.raises(ConfigError, match=rf"ParallelConfig.tensor_parallel: {tp} .*{match}"):
        validate_layout(cfg, ParallelConfig(tensor_parallel=tp))


def test_pp_must_divide_layers():
    cfg = get_preset("florence-gemma-2-xlarge")  # 42 layers
    validate_layout(cfg, ParallelConfig(pipeline_parallel=6))
    with pytest.raises(ConfigError, match="ParallelConfig.pipeline_parallel.*num_layers 42"):
        validate_layout(cfg, ParallelConfig(pipeline_parallel=4))
    with pytest.raises(ConfigError, match="virtual_pipeline_parallel = 12"):
        validate_layout(cfg, ParallelConfig(pipeline_parallel=2, virtual_pipeline_parallel=6))


def test_field_errors_name_field_and_fix():
    with pytest.raises(
        ConfigError, match="ParallelConfig.sequence_parallel: needs tensor_parallel > 1"
    ):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ConfigError, match="DecoderConfig.num_kv_heads"):
        DecoderConfig(num_attention_heads=8, num_kv_heads=3)
    with pytest.raises(ConfigError, match="DecoderConfig.layer_types: needs 26 entries"):
        DecoderConfig(layer_types=("full_attention",) * 3)
    with pytest.raises(ConfigError, match="DecoderConfig.sliding_window"):
        DecoderConfig(sliding_window=None)
    with pytest.raises(ConfigError, match="PrecisionConfig.params_dtype"):
        PrecisionConfig(params_dtype="fp64")
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        ParallelConfig(tensor_parallel=4).resolve_data_parallel(6)
    with pytest.raises(ConfigError, match="DecoderConfig.encoder_hidden_size"):
        m = get_preset("debug-gemma")
        dataclasses.replace(m, decoder=dataclasses.replace(m.decoder, encoder_hidden_size=32))


def test_replace_keeps_hf_alternation_when_layers_change():
    d = dataclasses.replace(get_preset("debug-gemma").decoder, num_layers=3)
    assert d.resolved_layer_types == ("sliding_attention", "full_attention", "sliding_attention")


def test_florence_family_caps_final_logits_and_follows_official_tables():
    """SYSTEM.md "Decoder side, Florence-2 sizes": soft-cap 30 on the final logits (debug
    preset too: it is the family's test model); official configs' position tables and
    encoder vocabularies (51,328 rows for the Florence sizes, 51,289 for the Gemma sizes)."""
    for name in ("florence-2-base", "florence-2-large", "debug-florence"):
        d = get_preset(name).decoder
        assert d.arch == "bart" and d.final_logit_softcap == 30.0 and d.attn_logit_softcap is None
    for name, enc_rows, positions in [
        ("florence-2-base", 51328, 1024),
        ("florence-2-large", 51328, 4096),
        ("florence-gemma-2-large", 51289, 4096),
        ("florence-gemma-2-xlarge", 51289, 4096),
    ]:
        e = get_preset(name).encoder
        assert (e.padded_vocab_size, e.max_position_embeddings) == (enc_rows, positions), name


def test_vision_train_mode_is_a_typed_override_that_survives_serialisation():
    from mmcap.config import replace
    from mmcap.config.serialize import model_config_from_dict, model_config_to_dict

    cfg = replace(get_preset("debug-gemma"), vision_train_mode=True)
    data = model_config_to_dict(cfg)
    assert model_config_from_dict(data) == cfg
    del data["vision_train_mode"]  # written before the switch existed: mmcap's default
    assert model_config_from_dict(data).vision_train_mode is False
    with pytest.raises(ConfigError, match="ModelConfig.vision_train_mode"):
        replace(cfg, vision_train_mode="yes")
    with pytest.raises(ValueError, match="vision_train_mod: unknown key"):
        model_config_from_dict({**data, "vision_train_mod": True})
