"""Structure discovery, capabilities, AdapterSpec overrides and validation failures."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tokensmith.models import AdapterSpec, ModelAdapter, StructureError, discover
from tokensmith.models.tiny import tiny_model_and_tokenizer

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# arch -> (layers path, final norm path, num_kv_heads, tied)
EXPECTED = {
    "gpt2": ("transformer.h", "transformer.ln_f", 4, True),
    "llama": ("model.layers", "model.norm", 2, False),
    "qwen2": ("model.layers", "model.norm", 2, False),
    "gemma3": ("model.layers", "model.norm", 2, True),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm", 4, False),
    "bert": ("bert.encoder.layer", None, 4, True),
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_capabilities_contents(arch, shared_tiny):
    ad = shared_tiny(arch)
    layers_path, norm_path, kv, tied = EXPECTED[arch]
    caps = ad.capabilities()
    st = caps["structure"]
    assert st["layers"] == layers_path and st["final_norm"] == norm_path
    assert st["num_layers"] == 2 == len(ad.structure.layers)
    assert (st["num_heads"], st["num_kv_heads"], st["head_dim"]) == (4, kv, 16)
    assert st["hidden_size"] == 64 and st["vocab_size"] == len(ad.tokenizer)
    # tied: independent check by storage identity
    w_in = ad.model.get_input_embeddings().weight
    w_out = ad.model.get_output_embeddings().weight
    assert st["tied_embeddings"] is tied is (w_in.data_ptr() == w_out.data_ptr())
    want_scale = math.sqrt(64) if arch == "gemma3" else 1.0
    assert st["embed_scale"] == pytest.approx(want_scale, rel=1e-3)
    assert st["is_causal"] is (arch != "bert")
    assert st["found_by"]["layers"].startswith("transformers metadata")
    # discovered modules are the real ones
    assert ad.structure.layers is ad.model.get_submodule(layers_path)
    assert ad.structure.embed is ad.model.get_input_embeddings()
    for i in range(2):
        q = ad.structure.q_proj[i]
        if arch in ("llama", "qwen2", "gemma3"):
            assert q is ad.structure.layers[i].self_attn.q_proj
            assert ad.structure.mlp_out[i] is ad.structure.layers[i].mlp.down_proj
    assert caps["model_class"] == type(ad.model).__name__
    assert caps["attn_implementation"] == "sdpa"


class _Toy(nn.Module):
    """A custom model whose blocks are not an nn.ModuleList: nothing to discover."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2)
        self.emb = nn.Embedding(300, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, **kwargs):
        return self.blocks(self.emb(input_ids))


def test_model_without_discoverable_layers_names_adapterspec(shared_tiny):
    tok = shared_tiny("llama").tokenizer
    with pytest.raises(StructureError, match=r"AdapterSpec\(layers="):
        discover(_Toy())
    with pytest.raises(ValueError, match="AdapterSpec"):  # StructureError is a ValueError
        ModelAdapter(_Toy(), tok)
    # the override makes it usable
    ad = ModelAdapter(_Toy(), tok, spec=AdapterSpec(layers="blocks"))
    assert ad.structure.num_layers == 2 and ad.structure.found_by["layers"] == "AdapterSpec"
    with torch.no_grad(), ad.hooks(cache="layers.*.resid_post") as h:
        ad.forward(torch.tensor([[5, 6, 7]]))
    x = ad.model.emb(torch.tensor([[5, 6, 7]]))
    torch.testing.assert_close(h.cache["layers.1.resid_post"], ad.model.blocks(x))


def test_explicit_spec_with_the_right_paths_matches_discovery(shared_tiny):
    ref = shared_tiny("llama")
    model, tok = tiny_model_and_tokenizer("llama", seed=0)
    spec = AdapterSpec(
        layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
        attn="self_attn", mlp="mlp", q_proj="self_attn.q_proj", o_proj="self_attn.o_proj", mlp_out="mlp.down_proj",
    )
    ad = ModelAdapter(model, tok, spec=spec)
    s = ad.structure
    assert s.layers is model.model.layers and s.embed is model.model.embed_tokens
    assert s.final_norm is model.model.norm and s.lm_head is model.lm_head
    assert s.q_proj[1] is model.model.layers[1].self_attn.q_proj
    assert s.mlp_out[0] is model.model.layers[0].mlp.down_proj
    assert {s.found_by[k] for k in ("layers", "embed", "final_norm", "lm_head")} == {"AdapterSpec"}
    text = "Hello there"
    torch.testing.assert_close(ad.token_logprobs(text), ref.token_logprobs(text), atol=0, rtol=0)
    assert ad.hook_names() == ref.hook_names()


def test_wrong_spec_paths_raise():
    model, tok = tiny_model_and_tokenizer("llama", seed=0)
    with pytest.raises(StructureError, match=r"AdapterSpec\.layers='model\.nope' does not exist"):
        ModelAdapter(model, tok, spec=AdapterSpec(layers="model.nope"))
    with pytest.raises(StructureError, match="not a non-empty nn.ModuleList"):
        ModelAdapter(model, tok, spec=AdapterSpec(layers="model.layers.0.mlp"))
    with pytest.raises(StructureError, match=r"AdapterSpec\.embed"):
        ModelAdapter(model, tok, spec=AdapterSpec(embed="model.embeddings"))
    with pytest.raises(StructureError, match="multiple"):
        ModelAdapter(model, tok, spec=AdapterSpec(num_kv_heads=3))
    with pytest.raises(StructureError, match="heads"):
        ModelAdapter(model, tok, spec=AdapterSpec(num_heads=2, num_kv_heads=2))


def test_spec_that_passes_discovery_but_fails_validation():
    model, tok = tiny_model_and_tokenizer("llama", seed=0)
    layers = model.model.layers
    # a ModuleList of the real layers in the wrong order: layer "0" is really layer 1. It is set as a plain
    # attribute (not a registered submodule): registering an alias makes transformers' own output capture
    # record every layer twice, and validation then has no same-length hidden_states to compare against
    object.__setattr__(model.model, "shuffled", nn.ModuleList([layers[1], layers[0]]))
    with pytest.raises(StructureError, match=r"run in the order \[1, 0\]"):
        ModelAdapter(model, tok, spec=AdapterSpec(layers="model.shuffled"))
    # the right call order but a repeated layer: "layer 1" is really layer 0
    object.__setattr__(model.model, "repeated", nn.ModuleList([layers[0], layers[0]]))
    with pytest.raises(StructureError, match=r"layer 1 output does not match hidden_states\[2\]"):
        ModelAdapter(model, tok, spec=AdapterSpec(layers="model.repeated"))
    # a ModuleList that the forward never calls
    model.model.unused = nn.ModuleList([copy.deepcopy(m) for m in layers])
    with pytest.raises(StructureError, match="never ran"):
        ModelAdapter(model, tok, spec=AdapterSpec(layers="model.unused"))
    # without validation the wrong spec is accepted (the user asked for it)
    ad = ModelAdapter(model, tok, spec=AdapterSpec(layers="model.shuffled"), validate=False)
    assert ad.structure.layers is model.model.shuffled
    # the model was not modified by the failed attempts: discovery still finds the real stack
    assert ModelAdapter(model, tok).structure.layers is layers


def test_discovery_prefers_metadata_over_a_same_length_modulelist():
    model, tok = tiny_model_and_tokenizer("qwen2", seed=0)
    model.decoy = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])  # same length as the layer stack
    s = discover(model)
    assert s.layers is model.model.layers


def test_registered_alias_stack_in_the_wrong_order_is_refused():
    # with a *registered* alias ModuleList transformers reports more hidden_states than there are layers, so
    # the per-layer comparison cannot align; the call-order check (and the unembed check) still catch it
    model, tok = tiny_model_and_tokenizer("llama", seed=0)
    layers = model.model.layers
    model.model.shuffled = nn.ModuleList([layers[1], layers[0]])
    with pytest.raises(StructureError, match=r"run in the order \[1, 0\].*AdapterSpec\(layers="):
        ModelAdapter(model, tok, spec=AdapterSpec(layers="model.shuffled"))
    # the same alias in the right order is accepted; the hidden_states comparison is skipped with a reason
    model.model.aliased = nn.ModuleList([layers[0], layers[1]])
    ad = ModelAdapter(model, tok, spec=AdapterSpec(layers="model.aliased"))
    val = ad.capabilities()["validation"]
    assert val["layers_match_hidden_states"] is None and "entries" in val["skipped"]["layers_match_hidden_states"]
    assert val["unembed_matches_logits"] is True


def test_t5_logit_lens_includes_the_scale_between_norm_and_head(shared_tiny):
    """T5 multiplies the decoder output by d_model**-0.5 before the tied LM head, as a functional op between
    modules; unembed must reproduce the logits from the last decoder layer (it was 8x off at width 64)."""
    ad = shared_tiny("t5")
    ids = ad.tokenizer("translate: hello there", return_tensors="pt").input_ids
    dec = ad.tokenizer("hallo", return_tensors="pt").input_ids
    with torch.no_grad(), ad.hooks(cache=f"layers.{ad.structure.num_layers - 1}.resid_post") as h:
        out = ad.forward(ids, decoder_input_ids=dec)
    z = ad.unembed(h.cache[f"layers.{ad.structure.num_layers - 1}.resid_post"])
    assert abs(ad.structure.logit_scale - ad.config.d_model**-0.5) < 1e-6
    torch.testing.assert_close(z, out.logits, atol=1e-4 * out.logits.abs().max().item(), rtol=0)
