"""Prompt encoding (UMT5, as Wan2.1) and a tokenizer built locally for tiny models.

Wan encodes a prompt with UMT5, keeps the first ``seq_len`` (non-pad) token states and zero-pads to
a fixed length; this module does the same for any encoder/tokenizer pair loaded from a folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

UNCONDITIONAL_PROMPT = ""  # c_null when no negative prompt is configured (model.negative_prompt: the tiny default)
# Wan2.1's standard negative prompt (the Wan2.1 repository and diffusers' WanPipeline examples); the
# reference encodes it with UMT5 as c_null for training and sampling. The Wan configs set model.negative_prompt to it.
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                       "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
                       "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
_SPECIAL = ["<pad>", "</s>", "<unk>"]


def build_word_tokenizer(vocabulary: list[str], out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``vocabulary`` (plus pad/eos/unk), built without any download."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(_SPECIAL + sorted(set(vocabulary)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tiny_text_encoder(vocab_size: int, d_model: int, num_layers: int, num_heads: int, seed: int = 0) -> UMT5EncoderModel:
    """A randomly initialised tiny UMT5 encoder (same class as Wan2.1's text encoder)."""
    config = UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=2 * d_model,
                        num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=8,
                        relative_attention_max_distance=16, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0)
    torch.manual_seed(seed)
    return UMT5EncoderModel(config).eval()


def prompt_words(prompts: list[str]) -> list[str]:
    """The lower-case words of a list of prompts (the tiny tokenizer's vocabulary)."""
    return sorted({w for p in prompts for w in re.findall(r"\w+|[^\w\s]", p.lower())})


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_length: int,
                   batch_size: int = 64) -> torch.Tensor:
    """(B, max_length, D) fp32 embeddings, states past each prompt's length zeroed (as Wan does)."""
    device = next(text_encoder.parameters()).device
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        tokens = tokenizer(batch, padding="max_length", max_length=max_length, truncation=True,
                           add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        states = text_encoder(ids, attention_mask=mask).last_hidden_state.float()
        chunks.append(states * mask.unsqueeze(-1).to(states.dtype))
    return torch.cat(chunks).cpu()

