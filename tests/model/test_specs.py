"""Layers built from ModuleSpecs (mmcap.model.specs), the transformer_impl switch and the
Transformer Engine / FP8 configuration errors.

Transformer Engine cannot be installed on the CPU machines (its PyTorch bindings build from
source against CUDA), so the TE path itself is not run here: these tests cover which classes
each spec names, that the layers really take their linears and norms from the spec (a spec
with substitute classes builds the same model with those classes), the config the layers read,
and the errors a run gets when it asks for TE or FP8 without it.
"""

import dataclasses

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from mmcap.config import ConfigError, ParallelConfig, PrecisionConfig, get_preset
from mmcap.model import te as te_mod
from mmcap.model.norms import GemmaRMSNorm, LocalNorm
from mmcap.model.specs import bart_layer_spec, gemma2_layer_spec
from mmcap.model.transformer_config import (
    MMCapTransformerConfig,
    build_decoder_transformer_config,
    build_encoder_transformer_config,
)

FP32 = PrecisionConfig("fp32")


def _leaves(spec, path=""):
    """{dotted path: class} of every leaf class of a layer spec."""
    out = {}
    if isinstance(spec, ModuleSpec):
        out[path or "<layer>"] = spec.module
        if spec.submodules is not None:
            for f in dataclasses.fields(spec.submodules):
                sub = getattr(spec.submodules, f.name)
                if sub is not None:
                    out.update(_leaves(sub, f"{path}.{f.name}" if path else f.name))
    else:
        out[path] = spec
    return out


# --- which classes the specs name --------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda impl: gemma2_layer_spec(impl, cross_attention=True),
    lambda impl: bart_layer_spec(impl, decoder=True),
    lambda impl: bart_layer_spec(impl, decoder=False),
])
def test_local_and_te_specs_differ_only_in_linears_and_norms(make):
    from megatron.core.extensions import transformer_engine as mte

    local, te = _leaves(make("local")), _leaves(make("transformer_engine"))
    assert local.keys() == te.keys()
    swap = {
        ColumnParallelLinear: mte.TEColumnParallelLinear,
        RowParallelLinear: mte.TERowParallelLinear,
        LocalNorm: mte.TENorm,
    }
    for path, cls in local.items():
        if path.endswith("linear_kv"):
            # reads the TP-replicated encoder output; stays megatron-core's local linear
            assert cls is ColumnParallelLinear and te[path] is ColumnParallelLinear, path
        elif cls in swap:
            assert te[path] is swap[cls], path
        else:  # the layer / attention / MLP modules are the same classes
            assert te[path] is cls, path
    assert any(c is ColumnParallelLinear for c in local.values())
    assert any(c is LocalNorm for c in local.values())


def test_gemma_spec_without_cross_attention_and_unknown_impl():
    assert gemma2_layer_spec("local", cross_attention=False).submodules.cross_attention is None
    with pytest.raises(ValueError, match="transformer_impl 'apex'"):
        gemma2_layer_spec("apex")


# --- the config the layers read ---------------------------------------------------------------


def test_decoder_config_carries_the_gemma_fields():
    dec = get_preset("debug-gemma").decoder
    c = build_decoder_transformer_config(dec, ParallelConfig(), FP32)
    assert isinstance(c, MMCapTransformerConfig)
    assert c.arch == "gemma2" and c.transformer_impl == "local"
    assert c.softmax_scale == pytest.approx(dec.query_pre_attn_scalar**-0.5)
    assert c.layernorm_zero_centered_gamma and c.normalization == "RMSNorm"
    assert c.attn_logit_softcap == dec.attn_logit_softcap
    assert c.final_logit_softcap == dec.final_logit_softcap
    assert c.encoder_hidden_size == dec.encoder_hidden_size
    assert c.gated_cross_attention and c.gated_linear_unit and not c.add_bias_linear
    for i in range(dec.num_layers):
        assert c.window(i) == (dec.sliding_window if dec.is_sliding(i) else None)
    assert c.fp8 is None


def test_bart_configs_use_head_dim_scale_and_their_own_init():
    model = get_preset("debug-florence")
    d = build_decoder_transformer_config(model.decoder, ParallelConfig(), FP32)
    e = build_encoder_transformer_config(model.encoder, ParallelConfig(), FP32)
    for c, init_std in ((d, model.decoder.init_std), (e, model.encoder.init_std)):
        assert c.arch == "bart" and c.softmax_scale is None and c.attn_logit_softcap is None
        assert not c.layernorm_zero_centered_gamma and c.normalization == "LayerNorm"
        assert c.attention_init_std == init_std and c.window(0) is None
    assert e.encoder_hidden_size is None and e.activation == model.encoder.activation
    assert d.activation_dropout == model.decoder.activation_dropout


# --- the layers really come from the spec ------------------------------------------------------


class TaggedColumn(ColumnParallelLinear):
    pass


class TaggedRow(RowParallelLinear):
    pass


class TaggedNorm:
    built = 0

    def __new__(cls, config, hidden_size, eps):
        TaggedNorm.built += 1
        return LocalNorm(config, hidden_size, eps)


def _tagged(spec):
    """``spec`` with every local linear (except linear_kv) and norm swapped for a tag class."""
    if not isinstance(spec, ModuleSpec):
        return {ColumnParallelLinear: TaggedColumn, RowParallelLinear: TaggedRow,
                LocalNorm: TaggedNorm}.get(spec, spec)
    if spec.submodules is None:
        return spec
    subs = {}
    for f in dataclasses.fields(spec.submodules):
        v = getattr(spec.submodules, f.name)
        subs[f.name] = v if f.name == "linear_kv" or v is None else _tagged(v)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **subs))


@pytest.mark.parametrize("preset", ["debug-gemma", "debug-florence"])
def test_layers_are_built_from_the_spec(single_rank_parallel_state, preset, monkeypatch):
    """A spec with substitute linear / norm classes builds a decoder whose layers use exactly
    those classes, with the same parameter names, shapes and (same seed) values and outputs as
    the stock local spec: the spec is the one switch between implementations."""
    import mmcap.model.specs as specs
    from mmcap.model.captioner import CaptioningModel

    model = get_preset(preset)

    def build(tag):
        if tag:
            monkeypatch.setattr(specs, "layer_spec", lambda c, decoder=True: _tagged(
                original(c, decoder=decoder)))
        else:
            monkeypatch.setattr(specs, "layer_spec", original)
        torch.manual_seed(0)
        return CaptioningModel(model, precision=FP32).eval()

    original = specs.layer_spec
    TaggedNorm.built = 0
    stock, tagged = build(False), build(True)
    assert TaggedNorm.built > 0
    layer = tagged.decoder.layers[0]
    kinds = {type(m) for m in layer.modules()}
    assert TaggedColumn in kinds and TaggedRow in kinds
    assert ColumnParallelLinear in kinds  # the cross-attention's linear_kv only
    assert type(layer.cross_attention.linear_kv) is ColumnParallelLinear
    enc_kinds = {type(m) for m in tagged.encoder.layers[0].modules()}
    assert TaggedColumn in enc_kinds and TaggedRow in enc_kinds
    sd_a, sd_b = stock.state_dict(), tagged.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        if isinstance(sd_a[k], torch.Tensor):  # (megatron's linears add _extra_state: None)
            assert torch.equal(sd_a[k], sd_b[k]), k
    b, s = 2, 5
    ids = torch.randint(3, 50, (b, s))
    prompt = torch.randint(3, 50, (b, 4))
    pixels = torch.randn(b, 3, model.vision.image_size, model.vision.image_size)
    with torch.no_grad():
        out_a = stock(prompt, ids, pixel_values=pixels)
        out_b = tagged(prompt, ids, pixel_values=pixels)
    assert torch.equal(out_a, out_b)


# --- Transformer Engine / FP8 selection and errors ---------------------------------------------


def test_precision_config_fp8_combinations():
    PrecisionConfig("bf16", fp8="hybrid")  # auto: TE is resolved at startup, not here
    with pytest.raises(ConfigError, match="^PrecisionConfig.fp8: .*transformer_impl is 'local'"):
        PrecisionConfig("bf16", transformer_impl="local", fp8="hybrid")
    with pytest.raises(ConfigError, match="^PrecisionConfig.fp8: .*bf16"):
        PrecisionConfig("fp32", fp8="e4m3")
    with pytest.raises(ConfigError, match="^PrecisionConfig.fp8_recipe"):
        PrecisionConfig("bf16", fp8="hybrid", fp8_recipe="fast")
    with pytest.raises(ConfigError, match="^PrecisionConfig.transformer_impl"):
        PrecisionConfig("bf16", transformer_impl="te")


@pytest.fixture
def no_te(monkeypatch):
    monkeypatch.setattr(te_mod, "te_available", lambda: False)


def test_auto_is_local_without_te_and_errors_name_what_to_install(no_te):
    resolve = te_mod.resolve_transformer_impl
    assert resolve(PrecisionConfig("bf16")) == "local"
    assert resolve(PrecisionConfig("bf16", transformer_impl="local")) == "local"
    with pytest.raises(ConfigError) as e:
        resolve(PrecisionConfig("bf16", fp8="hybrid"))
    msg = str(e.value)
    assert msg.startswith("precision.fp8: FP8 training")
    assert "transformer_engine[pytorch]" in msg and "remove precision.fp8" in msg
    with pytest.raises(ConfigError, match="^precision.transformer_impl: .*not importable"):
        resolve(PrecisionConfig("bf16", transformer_impl="transformer_engine"))


def test_te_resolution_with_te_present(monkeypatch):
    monkeypatch.setattr(te_mod, "te_available", lambda: True)
    resolve = te_mod.resolve_transformer_impl
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve(PrecisionConfig("bf16")) == "local"  # TE without a GPU: auto stays local
    with pytest.raises(ConfigError, match="^precision.fp8: .*need CUDA"):
        resolve(PrecisionConfig("bf16", fp8="hybrid"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve(PrecisionConfig("bf16")) == "transformer_engine"
    assert resolve(PrecisionConfig("bf16", fp8="hybrid")) == "transformer_engine"
    assert resolve(PrecisionConfig("bf16", transformer_impl="local")) == "local"


def test_fp8_fields_reach_megatron_config(monkeypatch):
    """With TE (pretended) present, precision.fp8 becomes megatron-core's fp8 fields, which its
    get_fp8_context reads; full recompute is refused with FP8."""
    monkeypatch.setattr(te_mod, "te_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from mmcap.model import transformer_config as tc

    monkeypatch.setattr(tc, "resolve_transformer_impl", te_mod.resolve_transformer_impl)
    dec = get_preset("debug-gemma").decoder
    prec = PrecisionConfig("bf16", fp8="hybrid", fp8_recipe="tensorwise")
    c = build_decoder_transformer_config(dec, ParallelConfig(), prec)
    assert (c.fp8, c.fp8_recipe) == ("hybrid", "tensorwise")
    assert c.transformer_impl == "transformer_engine"
    assert c.fp8_amax_history_len == 1024 and c.fp8_amax_compute_algo == "max"
    with pytest.raises(ConfigError, match="^recompute: full recompute"):
        build_decoder_transformer_config(dec, ParallelConfig(), prec, recompute="full")
    plain = build_decoder_transformer_config(dec, ParallelConfig(), PrecisionConfig("bf16"))
    assert plain.fp8 is None
    with te_mod.fp8_layer_context(plain, 0):  # no FP8: a null context, no TE touched
        pass


def test_train_config_refuses_fp8_without_te_at_parse_time(no_te):
    from mmcap.train.overrides import load_train_config

    with pytest.raises(ConfigError) as e:
        load_train_config("debug-gemma", None, ["precision.fp8=hybrid"])
    assert str(e.value).startswith("precision.fp8:") and "Transformer Engine" in str(e.value)
    with pytest.raises(ConfigError, match="^precision.transformer_impl:"):
        load_train_config("debug-gemma", None, ["precision.transformer_impl=transformer_engine"])
    with pytest.raises(ConfigError, match="^recompute: full recompute"):
        load_train_config("debug-gemma", None, ["precision.fp8=hybrid", "recompute=full"])


def test_local_rmsnorm_must_be_zero_centred():
    c = build_decoder_transformer_config(get_preset("debug-gemma").decoder, ParallelConfig(), FP32)
    assert isinstance(LocalNorm(c, 8, 1e-6), GemmaRMSNorm)
    c2 = dataclasses.replace(c, layernorm_zero_centered_gamma=False)
    with pytest.raises(ValueError, match="zero-centred"):
        LocalNorm(c2, 8, 1e-6)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_stacks_enter_fp8_contexts_as_megatron_does(
    single_rank_parallel_state, monkeypatch, recipe
):
    """Delayed scaling: one FP8 autocast around each stack's layer loop; current scaling: one
    per layer, with the layer's global index (megatron-core's TransformerBlock). Run with local
    linears and a recording stand-in for megatron-core's get_fp8_context (no TE here)."""
    import contextlib

    import megatron.core.fp8_utils as fp8_utils

    from mmcap.model import transformer_config as tc
    from mmcap.model.captioner import CaptioningModel

    calls = []

    def recording(config, layer_no=-1, is_init=False):
        calls.append((config.arch, config.num_layers, layer_no))
        return contextlib.nullcontext()

    monkeypatch.setattr(fp8_utils, "get_fp8_context", recording)
    monkeypatch.setattr(tc, "resolve_transformer_impl", lambda precision: "local")
    cfg = get_preset("debug-gemma")
    prec = PrecisionConfig("bf16", fp8="hybrid", fp8_recipe=recipe)
    model = CaptioningModel(cfg, precision=prec).eval()
    assert model.decoder.config.fp8 == "hybrid" and calls == []
    v = cfg.vision.image_size
    with torch.no_grad():
        model(
            torch.randint(3, 50, (2, 6)),
            torch.randint(3, 50, (2, 5)),
            pixel_values=torch.randn(2, 3, v, v, dtype=torch.bfloat16),
        )
    enc, dec = cfg.encoder.num_layers, cfg.decoder.num_layers
    if recipe == "delayed":
        assert calls == [("bart", enc, -1), ("gemma2", dec, -1)]
    else:
        assert calls == [("bart", enc, i) for i in range(enc)] + [
            ("gemma2", dec, i) for i in range(dec)
        ]
