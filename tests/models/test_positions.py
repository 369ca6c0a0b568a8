"""Positions: the left-padding scheme measured at load (tokensmith.models.padding), the position limit
(tokensmith.models.positions), and the causality decision (structure.decide_causal), on model families
whose positions or attention differ from Llama's (issue 5, sections 5 and 6)."""

from __future__ import annotations

import pytest
import torch
import transformers

import tokensmith as ts
from tokensmith.models import AdapterSpec, ModelAdapter, StructureError
from tokensmith.models.padding import has_left_padding, logical_positions, probe_position_scheme
from tokensmith.models.tiny import tiny_model_and_tokenizer
from tokensmith.models.zoo import minilm_path, smollm2_tokenizer

SHORT, LONG = "Hello world", "The quick brown fox jumps over the lazy dog"
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def bpe():
    return smollm2_tokenizer(copy=True)


@pytest.fixture(scope="module")
def wordpiece():
    return transformers.AutoTokenizer.from_pretrained(str(minilm_path()))


def _build(cls, cfg, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg).eval()


def _perturb(model):
    """Move norm weights away from 1 (a wrong-norm pick then shows in the logits)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.Tensor):
                m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def roberta_lm(bpe):
    cfg = transformers.RobertaConfig(vocab_size=len(bpe), max_position_embeddings=64 + bpe.pad_token_id + 1,
                                     pad_token_id=bpe.pad_token_id, is_decoder=True, **SMALL)
    return ModelAdapter(_build(transformers.RobertaForCausalLM, cfg), bpe)


@pytest.fixture(scope="module")
def bart_lm(bpe):
    cfg = transformers.BartConfig(vocab_size=len(bpe), d_model=32, decoder_layers=2, encoder_layers=2,
                                  decoder_attention_heads=2, encoder_attention_heads=2, decoder_ffn_dim=64,
                                  encoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=bpe.pad_token_id)
    return ModelAdapter(_perturb(_build(transformers.BartForCausalLM, cfg)), bpe)


# ---------------------------------------------------------------------------------------------- helpers
def test_logical_positions_and_left_padding_detection():
    m = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    assert logical_positions(m).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3], [0, 1, 1, 1]]
    assert has_left_padding(m) and has_left_padding(m[:1])
    assert not has_left_padding(m[1:]) and not has_left_padding(torch.ones(2, 1))


# ---------------------------------------------------------------------------------------------- left padding
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_position_ids_counted_from_zero_for_most_models(arch, shared_tiny):
    p = shared_tiny(arch).positions
    assert (p.left_padding, p.pass_position_ids, p.offset) == (True, True, 0)
    assert p.max_rel_err is not None and p.max_rel_err < 1e-5


def test_roberta_counts_from_padding_idx_and_padded_rows_equal_rows_alone(roberta_lm, bpe):
    ad = roberta_lm
    assert ad.positions.offset == bpe.pad_token_id + 1 and ad.positions.left_padding
    batch = ad.encode_batch([(SHORT, " there"), (LONG, " again")])
    assert batch.attention_mask[0].sum() < batch.attention_mask.shape[1]  # row 0 is left-padded
    got = ad.token_logprobs(batch)
    for b, item in enumerate([(SHORT, " there"), (LONG, " again")]):
        alone = ad.token_logprobs(ad.encode(*item))[0]
        n = alone.shape[0]
        # the bug this pins (positions from 0, not padding_idx + 1) moves log-probs by ~0.7
        torch.testing.assert_close(got[b, -n:], alone, atol=1e-4, rtol=0)


def test_roberta_generation_uses_the_models_own_positions(roberta_lm):
    ad = roberta_lm
    enc = ad.encode(LONG)
    with torch.no_grad():
        want = ad.model(input_ids=enc.input_ids[None]).logits[0, -1].argmax()  # HF's own positions
    g = ad.generate(LONG, max_new_tokens=2)
    assert int(g.new_tokens[0][0]) == int(want)


def test_model_that_cannot_take_left_padding_refuses_it_loudly(bart_lm):
    ad = bart_lm
    assert ad.positions.left_padding is False and "differs" in ad.positions.reason
    assert ad.capabilities()["features"]["left_padding"] is False
    batch = ad.encode_batch([SHORT, LONG])
    for call in (lambda: ad.token_logprobs(batch), lambda: ad.forward(batch), lambda: ad.generate(batch)):
        with pytest.raises(ValueError, match="cannot take left-padded input"):
            call()
    # rows alone, equal-length batches and right padding still run (their positions are right)
    alone = ad.token_logprobs(ad.encode(SHORT))
    two = ad.token_logprobs(ad.encode_batch([SHORT, SHORT]))
    torch.testing.assert_close(two[0], alone[0], atol=1e-5, rtol=0)
    ids = ad.encode_batch([SHORT]).input_ids
    right = {"input_ids": torch.cat([ids, ids[:, :1]], 1), "attention_mask": torch.tensor([[1] * ids.shape[1] + [0]])}
    z = ad.forward(right).logits[0, : ids.shape[1]]
    torch.testing.assert_close(z, ad.forward(ids).logits[0], atol=1e-5, rtol=0)


def test_probe_without_an_attention_mask_refuses_padding():
    class NoMask(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids.float()

    p = probe_position_scheme(NoMask(), {"input_ids"}, torch.tensor([[1, 2]]), 0)
    assert p.left_padding is False and "attention_mask" in p.reason


# ---------------------------------------------------------------------------------------------- limits
def test_learned_position_table_limit_is_a_clear_error(shared_tiny):
    ad = shared_tiny("gpt2")
    n = ad.config.n_positions
    assert ad.max_positions == n and ad.position_limit.table_limit == n
    ad.token_logprobs(torch.randint(5, 100, (1, n)))  # exactly the limit runs
    with pytest.raises(ValueError, match=rf"needs {n + 1} positions .* at most {n}.*cannot be extended"):
        ad.token_logprobs(torch.randint(5, 100, (1, n + 1)))
    with pytest.raises(ValueError, match="positions"):
        ad.forward(inputs_embeds=torch.zeros(1, n + 1, ad.structure.hidden_size))
    with pytest.raises(ValueError, match="learned position table"):
        ad.max_positions = None  # a learned table cannot be opted out of


def test_rotary_limit_raises_and_can_be_opted_out(shared_tiny):
    model, tok = tiny_model_and_tokenizer("llama", max_position_embeddings=32)
    ad = ModelAdapter(model, tok)
    assert ad.max_positions == 32 and ad.position_limit.table_limit is None
    ids = torch.randint(5, 100, (1, 40))
    with pytest.raises(ValueError, match=r"needs 40 positions .* at most 32 \(config\.max_position_embeddings=32\)"):
        ad.token_logprobs(ids)
    prompt = ad.encode_batch(["a " * 10])
    T = prompt.input_ids.shape[1]
    with pytest.raises(ValueError, match=f"the prompt plus max_new_tokens needs {T + 40} positions"):
        ad.generate(prompt, max_new_tokens=40)
    ad.max_positions = None
    assert ad.token_logprobs(ids).shape == (1, 40)
    ad2 = ModelAdapter(model, tok, max_positions=64)
    assert ad2.token_logprobs(ids).shape == (1, 40)
    with pytest.raises(TypeError):
        ModelAdapter(model, tok, max_positions=0)


def test_roberta_table_counts_from_padding_idx(roberta_lm, bpe):
    ad = roberta_lm
    assert ad.position_limit.table_limit == 64  # 64 + padding_idx + 1 rows, the first padding_idx + 1 unused
    with pytest.raises(ValueError, match="at most 64"):
        ad.token_logprobs(torch.randint(5, 100, (1, 65)))


# ---------------------------------------------------------------------------------------------- causality
ENCODERS = {
    "distilbert": (transformers.DistilBertConfig, transformers.DistilBertForMaskedLM,
                   dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64)),
    "deberta-v2": (transformers.DebertaV2Config, transformers.DebertaV2ForMaskedLM, SMALL),
    "mpnet": (transformers.MPNetConfig, transformers.MPNetForMaskedLM, SMALL),
    "modernbert": (transformers.ModernBertConfig, transformers.ModernBertForMaskedLM, SMALL),
    "bert": (transformers.BertConfig, transformers.BertForMaskedLM, SMALL),
}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoders_are_never_scored_causally(name, wordpiece):
    cfg_cls, cls, kw = ENCODERS[name]
    cfg = cfg_cls(vocab_size=len(wordpiece), pad_token_id=wordpiece.pad_token_id, **kw)
    if name == "modernbert":
        cfg.bos_token_id = cfg.cls_token_id = wordpiece.cls_token_id
        cfg.eos_token_id = cfg.sep_token_id = wordpiece.sep_token_id
    model = _build(cls, cfg)
    ids = wordpiece(LONG, return_tensors="pt").input_ids
    alt = ids.clone()
    alt[0, -2] = ids[0, 1]
    with torch.no_grad():  # measured: a later token changes earlier outputs
        assert (model(input_ids=alt).logits[0, :3] - model(input_ids=ids).logits[0, :3]).abs().max() > 1e-6
    ad = ModelAdapter(model, wordpiece)
    assert ad.is_causal is False, ad.structure.found_by["is_causal"]
    feats = ad.capabilities()["features"]
    assert not feats["token_logprobs"] and not feats["generate"]
    with pytest.raises(ValueError, match="causal"):
        ad.token_logprobs(ids)


def test_bert_as_a_decoder_is_causal_and_the_override_wins(wordpiece):
    cfg = transformers.BertConfig(vocab_size=len(wordpiece), is_decoder=True, **SMALL)
    model = _build(transformers.BertLMHeadModel, cfg)
    ad = ModelAdapter(model, wordpiece)
    assert ad.is_causal and "is_causal=True" in ad.structure.found_by["is_causal"]
    forced = ModelAdapter(model, wordpiece, spec=AdapterSpec(is_causal=False))
    assert forced.is_causal is False and forced.structure.found_by["is_causal"] == "AdapterSpec(is_causal=...)"


# ---------------------------------------------------------------------------------------------- validation
def test_wrong_lm_head_and_final_norm_specs_name_the_field():
    model, tok = tiny_model_and_tokenizer("gpt_neox")
    with pytest.raises(StructureError, match=r"AdapterSpec\(final_norm=.*lm_head="):
        ModelAdapter(model, tok, spec=AdapterSpec(lm_head="gpt_neox.embed_in"))
    model, tok = tiny_model_and_tokenizer("llama")
    _perturb(model)
    with pytest.raises(StructureError, match=r"final norm .*AdapterSpec\(final_norm="):
        ModelAdapter(model, tok, spec=AdapterSpec(final_norm="model.layers.0.input_layernorm"))
    ad = ModelAdapter(model, tok)  # discovery itself picks the right norm on the same model
    assert ad.structure.final_norm is model.model.norm
    assert ad.capabilities()["validation"]["unembed_matches_logits"] is True


def test_wrong_attention_spec_names_the_field(shared_tiny):
    model, tok = tiny_model_and_tokenizer("llama")
    with pytest.raises(StructureError, match=r"Pass AdapterSpec\(attn='self_attn'\)"):
        ModelAdapter(model, tok, spec=AdapterSpec(attn="mlp"))


def test_weight_shared_layers_fail_at_load_with_a_clear_error(wordpiece):
    cfg = transformers.AlbertConfig(vocab_size=len(wordpiece), embedding_size=16, **SMALL)
    model = _build(transformers.AlbertForMaskedLM, cfg)
    with pytest.raises(StructureError, match="shares one block's weights across depth"):
        ModelAdapter(model, wordpiece)
    ad = ModelAdapter(model, wordpiece, validate=False)  # forward still works on request
    assert ad.forward(wordpiece(SHORT, return_tensors="pt").input_ids).logits.shape[-1] == len(wordpiece)


def test_tiny_default_zoo_models_are_unchanged_by_the_probe():
    ad = ts.tiny("llama")
    before = {k: v.clone() for k, v in ad.model.state_dict().items()}
    ModelAdapter(ad.model, ad.tokenizer)
    assert all(torch.equal(before[k], v) for k, v in ad.model.state_dict().items())
    assert ad.model.training is False


def test_attention_validation_can_fail_and_then_turns_the_probe_off(monkeypatch):
    """The load-time attention check compares the probe with the model's eager weights; a probe that
    computes wrong probabilities is caught (recorded, and ``features['attention_probe']`` turns False)."""
    from tokensmith.models import attention

    model, tok = tiny_model_and_tokenizer("llama")
    good = ModelAdapter(model, tok)
    rep = good.capabilities()["validation"]["attention"]
    assert rep["status"] == "matches eager attention" and rep["max_abs_err_vs_eager"] < 1e-5
    real = attention.eager_attention_probs

    def skewed(*a, **k):  # a probe bug: probabilities of the wrong (reversed) keys
        return real(*a, **k).flip(-1)

    monkeypatch.setattr(attention, "eager_attention_probs", skewed)
    bad = ModelAdapter(model, tok)
    assert "disagrees" in bad.capabilities()["validation"]["attention"]["status"]
    assert bad.capabilities()["features"]["attention_probe"] is False
