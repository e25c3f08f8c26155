"""The default model from its GGUF file against transformers' own loading of that file."""

import numpy as np
import torch

from jaxinfer.bench import english_text


def test_logits_match_transformers_on_real_text(smollm2, hf_smollm2):
    ids = smollm2.tokenizer.encode(english_text()[2000:3000])[:160]
    assert len(ids) == 160
    ours = smollm2.logits(ids)[0]
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].float().numpy()
    assert ours.shape == ref.shape == (160, 49152)
    assert np.abs(ours - ref).max() <= 1e-3, np.abs(ours - ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_config_and_special_tokens(smollm2):
    c = smollm2.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff) == (
        30, 576, 9, 3, 64, 1536)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and c.vocab_size == 49152
    assert 2 in smollm2.eos_token_ids  # <|im_end|>
    assert smollm2.tokenizer.decode([2]) == "<|im_end|>"
    text = smollm2.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
