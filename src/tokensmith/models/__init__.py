"""tokensmith.models — the shared model-adapter layer every subpackage stands on.

Entry points: :func:`load` (bundled offline models or any HF model), :func:`tiny` (random tiny models
for tests), and :class:`ModelAdapter` (wrap a model + tokenizer you already have).
"""

from tokensmith.models import heads, kvcache, masking, rerotate
from tokensmith.models.adapter import GenerationResult, ModelAdapter
from tokensmith.models.attention import AttentionProbe
from tokensmith.models.batching import MicroBatcher
from tokensmith.models.embeddings import insert_embeddings
from tokensmith.models.encoding import (
    Encoded,
    EncodedBatch,
    Slot,
    Span,
    decode_slot,
    encode,
    pad_batch,
    reencode,
    slot_round_trip,
)
from tokensmith.models.headchunk import chunked_head_logprobs, final_hidden
from tokensmith.models.heads import (
    Head,
    HeadOutputs,
    add_head,
    capture,
    forward_with_heads,
    head_modules,
    list_heads,
    load_heads,
    remove_head,
    save_heads,
)
from tokensmith.models.hooks import ActivationCache, HookContext, HookSession, ablate_fn, patch_fn, steer_fn
from tokensmith.models.layers import (
    run_layers,
    skip_layer_for_tokens,
    skip_layers,
    swap_layers,
    truncate_layers,
)
from tokensmith.models.logprobs import gather_logprobs, masked_mean, masked_sum, token_kl
from tokensmith.models.masking import MaskContext, attention_override, local_window, separator_mask
from tokensmith.models.norms import AttentionNorms, NormForm, attention_norms, norm_form
from tokensmith.models.offload import execution_device, is_offloaded, offloaded_value
from tokensmith.models.rerotate import RerotateResult, rerotate_cache
from tokensmith.models.structure import AdapterSpec, ModelStructure, StructureError, discover
from tokensmith.models.surgery import replace_vocabulary
from tokensmith.models.tiny import tiny
from tokensmith.models.vocab import allowed_token_mask, nearest_tokens, soft_embed
from tokensmith.models.zoo import available_models, load

__all__ = [
    "ModelAdapter",
    "execution_device",
    "is_offloaded",
    "offloaded_value",
    "heads",
    "Head",
    "HeadOutputs",
    "add_head",
    "remove_head",
    "list_heads",
    "head_modules",
    "capture",
    "forward_with_heads",
    "save_heads",
    "load_heads",
    "final_hidden",
    "replace_vocabulary",
    "attention_override",
    "local_window",
    "separator_mask",
    "MaskContext",
    "rerotate_cache",
    "RerotateResult",
    "chunked_head_logprobs",
    "GenerationResult",
    "AdapterSpec",
    "ModelStructure",
    "StructureError",
    "discover",
    "load",
    "tiny",
    "available_models",
    "Slot",
    "Span",
    "Encoded",
    "EncodedBatch",
    "encode",
    "reencode",
    "slot_round_trip",
    "decode_slot",
    "pad_batch",
    "HookSession",
    "HookContext",
    "ActivationCache",
    "steer_fn",
    "patch_fn",
    "ablate_fn",
    "AttentionProbe",
    "MicroBatcher",
    "gather_logprobs",
    "token_kl",
    "masked_sum",
    "masked_mean",
    "allowed_token_mask",
    "nearest_tokens",
    "soft_embed",
    "insert_embeddings",
    "kvcache",
    "masking",
    "rerotate",
    "run_layers",
    "skip_layers",
    "truncate_layers",
    "swap_layers",
    "skip_layer_for_tokens",
    "NormForm",
    "norm_form",
    "AttentionNorms",
    "attention_norms",
]
