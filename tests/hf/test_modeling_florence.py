"""Florence family of mmcap's HF captioner against transformers' native Florence-2.

With encoder and decoder embeddings both set to the native ``shared`` table the logits must be
identical (fp32, <= 1e-5: the same transformers modules run in the same order; observed 0).
Then the decoder vocabulary is made different from the encoder's (1200 vs 1000 rows), which the
native class cannot hold.
"""

import copy

import pytest
import torch

from mmcap.hf.configuration_mmcap import MmcapCaptionerConfig
from mmcap.testing.hf_models import tiny_florence2
from tests.hf._tiny import SHARED, encoder_inputs, florence_family


@pytest.fixture(scope="module")
def native():
    return tiny_florence2(seed=0)


@pytest.fixture(scope="module")
def model(native):
    return florence_family(native)


def test_parameter_names_are_native_minus_shared(native, model):
    ours, theirs = set(model.state_dict()), set(native.state_dict())
    assert ours == theirs - {SHARED}
    # The split: both tables exist on our side as their own parameters.
    params = dict(model.named_parameters())
    enc = params["model.language_model.encoder.embed_tokens.weight"]
    dec = params["model.language_model.decoder.embed_tokens.weight"]
    assert enc is not dec
    assert model.lm_head.weight is dec  # tied: decoder embedding <-> LM head
    assert set(model.all_tied_weights_keys) == {"lm_head.weight"}


def test_logits_equal_native(native, model):
    pixel_values, input_ids, attention_mask = encoder_inputs(native.config.image_token_id)
    dec = torch.randint(2, 1000, (2, 6), generator=torch.Generator().manual_seed(3))
    kw = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
    with torch.no_grad():
        ref = native(**kw, decoder_input_ids=dec).logits
        got = model(**kw, decoder_input_ids=dec).logits
    assert got.shape == ref.shape == (2, 6, 1000)
    assert (got - ref).abs().max().item() <= 1e-5


def test_separate_decoder_vocabulary(native):
    model = florence_family(native, decoder_vocab_size=1200)
    emb = model.get_input_embeddings()
    assert emb.weight.shape == (1200, 64)
    assert model.model.language_model.encoder.embed_tokens.weight.shape == (1000, 64)
    assert model.get_output_embeddings().weight is emb.weight
    pixel_values, input_ids, attention_mask = encoder_inputs(native.config.image_token_id)
    labels = torch.randint(2, 1200, (2, 5), generator=torch.Generator().manual_seed(4))
    labels[0, 3:] = -100
    with torch.no_grad():
        out = model(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
        )
    assert out.logits.shape == (2, 5, 1200)
    # Loss: mean token CE over labels != -100, decoder inputs = labels shifted right after 1.
    keep = labels != -100
    ref = torch.nn.functional.cross_entropy(out.logits[keep], labels[keep])
    assert abs(out.loss.item() - ref.item()) <= 1e-6
    shifted = torch.cat([torch.ones(2, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], 1)
    with torch.no_grad():
        again = model(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=shifted,
        ).logits
    assert torch.allclose(again, out.logits, atol=1e-6)


def test_generate_greedy_beam_and_cache(native):
    model = florence_family(native, decoder_vocab_size=1200)
    pixel_values, input_ids, attention_mask = encoder_inputs(native.config.image_token_id)
    kw = {
        "pixel_values": pixel_values,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "max_new_tokens": 8,
        "min_new_tokens": 8,
    }
    greedy = model.generate(**kw)
    assert greedy.shape == (2, 9) and (greedy[:, 0] == 1).all()  # decoder start = eos (1)
    assert torch.equal(model.generate(**kw, use_cache=False), greedy)
    beams = model.generate(**kw, num_beams=4)
    assert beams.shape == (2, 9) and int(beams.max()) < 1200
    # Greedy picks the argmax of the teacher-forced logits at every step.
    with torch.no_grad():
        logits = model(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=greedy[:, :-1],
        ).logits
    assert torch.equal(logits.argmax(-1), greedy[:, 1:])


def test_generate_infers_encoder_mask_from_bart_pad(native, model):
    """Without an attention_mask, generate masks BART <pad> (1), not Gemma's pad id 0 (which
    is BART's <s>)."""
    pixel_values, input_ids, _ = encoder_inputs(native.config.image_token_id)
    input_ids[:, 5] = 0  # BART <s> after the image tokens, as the processor emits
    kw = {
        "pixel_values": pixel_values,
        "input_ids": input_ids,
        "max_new_tokens": 4,
        "min_new_tokens": 4,
        "output_logits": True,
        "return_dict_in_generate": True,
        "num_beams": 1,  # one row per sample in the step logits
    }
    implicit = model.generate(**kw)
    explicit = model.generate(**kw, attention_mask=(input_ids != 1).long())
    unmasked = model.generate(**kw, attention_mask=torch.ones_like(input_ids))
    assert torch.equal(implicit.sequences, explicit.sequences)
    a, b, u = (torch.stack(x.logits, 1) for x in (implicit, explicit, unmasked))
    assert torch.equal(a, b)  # (transformers itself builds no mask for encoder-decoder models)
    assert (a[1] - u[1]).abs().max().item() > 1e-4  # sample 1 has 3 pad positions


def test_final_logit_softcap_in_forward_loss_and_generation(native):
    """``final_logit_softcapping=30`` (the paper's Florence sizes, official florence2.py):
    logits = 30 tanh(native / 30) in forward, in the loss and in every generation step."""
    big = copy.deepcopy(native)
    with torch.no_grad():  # logits of tens: the cap changes them visibly
        big.model.language_model.decoder.layers[-1].final_layer_norm.weight.mul_(40.0)
    plain = florence_family(big)
    capped = florence_family(big, final_logit_softcapping=30.0)
    pixel_values, input_ids, attention_mask = encoder_inputs(native.config.image_token_id)
    kw = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
    labels = torch.randint(2, 1000, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = plain(**kw, labels=labels)
        got = capped(**kw, labels=labels)
    expected = 30.0 * torch.tanh(ref.logits / 30.0)
    assert (expected - ref.logits).abs().max().item() > 1.0
    assert (got.logits - expected).abs().max().item() <= 1e-5
    ce = torch.nn.functional.cross_entropy(expected.flatten(0, 1), labels.flatten())
    assert abs(got.loss.item() - ce.item()) <= 1e-5 and abs(ce.item() - ref.loss.item()) > 1e-2
    gen = capped.generate(
        **kw,
        max_new_tokens=5,
        min_new_tokens=5,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        forced = capped(**kw, decoder_input_ids=gen.sequences[:, :-1]).logits
    steps = torch.stack(gen.logits, 1)
    assert (steps - forced).abs().max().item() <= 1e-4
    assert steps.abs().max().item() < 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        MmcapCaptionerConfig(final_logit_softcapping=-1.0)
