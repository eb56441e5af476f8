"""Tiny random T5 and CLIP text encoders saved to local folders as the release's ship (offline, for tests)."""

from __future__ import annotations

import io
import json

import torch

SENTENCES = [
    "a cat sits on the mat",
    "a dog runs in the park",
    "the camera pans over a city at night",
    "waves crash on the beach at sunset",
    "a red car drives down an empty road",
]


def build_t5(folder, d_model: int = 32) -> None:
    """A T5 sentencepiece tokenizer trained on a few sentences and a 2-layer random T5 encoder."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    folder.mkdir(parents=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4),
        model_writer=model,
        model_type="unigram",
        vocab_size=64,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    # The files google/t5-v1_1-xxl ships: spiece.model and a tokenizer config.
    (folder / "spiece.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    cfg = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
    )
    torch.manual_seed(0)
    T5EncoderModel(cfg).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def build_clip(folder, hidden_size: int = 24) -> None:
    """A byte-level BPE CLIP tokenizer over printable ASCII with a few merges and a 2-layer random CLIP text model."""
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True)
    chars = [chr(c) for c in range(33, 127)]
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "t h", "th e</w>"]
    vocab = chars + [c + "</w>" for c in chars] + ["ca", "cat</w>", "do", "dog</w>", "th", "the</w>"]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.tokenize("the cat") == ["the</w>", "cat</w>"]
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    CLIPTextModel(cfg).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
