"""Writing Hugging Face CLIP folders: a CLIP with our params, in the format `TextEncoder.from_folder`
(and `transformers.CLIPModel.from_pretrained`, `CLIPTokenizerFast.from_pretrained`) read.

The text-prompt demo and tests need no downloaded CLIP weights: they make their own.
`make_random_clip(folder, corpus)` learns a CLIP-format byte-level BPE vocabulary from
`corpus` (the files OpenAI's CLIP ships: vocab.json + merges.txt, and the tokenizer.json that
HF derives from them) and saves a small CLIP with random weights beside it. A random CLIP is
still a fixed, deterministic function of the tokens: different captions ("circle",
"triangle") get different embeddings, which is all a SAM trained on captions needs. With real
CLIP weights (`openai/clip-vit-large-patch14-336`), the same code path loads them.

    folder = make_random_clip("out/clip", ["circle", "triangle", "rectangle"])
    text_encoder = TextEncoder.from_folder(folder)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sam_jax.convert import keys
from sam_jax.modeling.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, init_clip_params

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer split (HF's `CLIPTokenizerFast` tokenizer.json): contractions, letters,
# single digits, runs of other non-space characters.
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_bpe(corpus: Sequence[str], n_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-format BPE from `corpus`: vocab (256 bytes, 256 bytes + "</w>", the merged tokens,
    BOS, EOS: CLIP's order) and the merges, most frequent pair first (ties: the larger pair)."""
    enc = bytes_to_unicode()
    vocab = list(enc.values()) + [c + "</w>" for c in enc.values()]
    known = set(vocab)
    words: collections.Counter = collections.Counter()
    for text in corpus:
        for w in re.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()):
            symbols = [enc[b] for b in w.encode()]
            symbols[-1] += "</w>"
            words[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for w, f in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += f
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        if best[0] + best[1] not in known:
            vocab.append(best[0] + best[1])
            known.add(vocab[-1])
        merged: collections.Counter = collections.Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += f
        words = merged
    vocab += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab)}, merges


def clip_tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
    """A `tokenizers.Tokenizer` in CLIP's format (what HF's CLIPTokenizerFast builds from
    vocab.json + merges.txt): NFC, whitespace collapsed, lowercase; CLIP's split, byte-level;
    BPE with "</w>" word ends; BOS ... EOS around every text."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(
        models.BPE(
            vocab, merges, unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.post_processor = processors.RobertaProcessing(
        (EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=False, add_prefix_space=False
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BOS, normalized=False), AddedToken(EOS, normalized=False)])
    return tok


def hf_config_dict(config: CLIPConfig) -> dict[str, Any]:
    """`CLIPConfig` -> the config.json of a HF `CLIPModel` (read back by `CLIPConfig.from_hf_dict`)."""
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.projection_dim,
        "logit_scale_init_value": config.logit_scale_init_value,
        "text_config": {"model_type": "clip_text_model", **dataclasses.asdict(config.text_config)},
        "vision_config": {"model_type": "clip_vision_model", **dataclasses.asdict(config.vision_config)},
    }


def hf_state_dict(params: Any, config: CLIPConfig) -> dict[str, np.ndarray]:
    """Our CLIP params -> HF `CLIPModel` state-dict arrays (the converter's key table, inverted)."""
    from sam_jax.convert.clip import clip_key_table

    out = {}
    for row in clip_key_table(config):
        value = params
        for k in row.flax:
            value = value[k]
        out[row.hf] = keys.INVERSE[row.transform](np.asarray(value))
    return out


def save_clip_folder(
    folder: str | os.PathLike, config: CLIPConfig, params: Any, vocab: dict[str, int], merges: list[tuple[str, str]]
) -> Path:
    """Write config.json, model.safetensors, vocab.json, merges.txt, tokenizer.json and
    tokenizer_config.json into `folder` (created; existing files there are replaced)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if max(vocab.values()) >= config.text_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(vocab)} tokens; the CLIP's vocab_size is {config.text_config.vocab_size}"
        )

    def write(name: str, text: str) -> None:
        tmp = folder / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, folder / name)

    tmp = folder / "model.safetensors.tmp"
    save_file(hf_state_dict(params, config), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    write("vocab.json", json.dumps(vocab, ensure_ascii=False))
    write("merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    write("tokenizer.json", clip_tokenizer_json(vocab, merges).to_str())
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "model_max_length": config.text_config.max_position_embeddings,
    }
    write("tokenizer_config.json", json.dumps(tokenizer_config, indent=1))
    write("config.json", json.dumps(hf_config_dict(config), indent=1))  # last: a folder with config.json is complete
    return folder


def small_clip_config(vocab_size: int, projection_dim: int = 64) -> CLIPConfig:
    """A small CLIP (text 64 x 2 layers, vision 32 px in 8 px patches) for `vocab_size` tokens."""
    return CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=projection_dim,
        name="clip_small_random",
    )


def make_random_clip(
    folder: str | os.PathLike,
    corpus: Sequence[str],
    *,
    config: CLIPConfig | None = None,
    n_merges: int = 200,
    seed: int = 0,
) -> Path:
    """A CLIP folder with a BPE learned from `corpus` and random weights (`small_clip_config` unless
    `config` is given; its vocab_size must cover the tokenizer). Deterministic for a seed."""
    vocab, merges = learn_bpe(list(corpus), n_merges)
    config = config or small_clip_config(len(vocab))
    params = jax.tree.map(np.asarray, init_clip_params(config, jax.random.key(seed)))
    return save_clip_folder(folder, config, params, vocab, merges)
