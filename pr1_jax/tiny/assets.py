"""Tiny self-contained assets for the embedded default run: tokenizer, policy, judge, data.

Why: `python -m pr1_jax.train` must run the whole method on a laptop CPU with no model hub. The
real architectures are kept (a Qwen2-VL policy, a Qwen2 judge, a Qwen2-style byte-level BPE
tokenizer with the Qwen chat/vision special tokens and the Qwen2-VL chat template), only made
tiny, and written as ordinary Hugging Face directories, so the run loads them through exactly
the code path a real checkpoint takes (`load_tokenizer`, `models.load_pretrained`).

    assets = build_tiny_assets("runs/tiny", seed=0)
    assets.tokenizer, assets.policy, assets.judge     # HF directories
    assets.train, assets.val                          # JSONL files (pr1_jax.tiny.synthetic task)
    assets.data_config("train", batch_size=8)         # DataConfig reading the train split

* :func:`train_tokenizer`: byte-level BPE trained on the synthetic task's text (prompts,
  responses, annotations, judge prompts) with the Qwen2 pre-tokenizer (same split regex,
  single digits, NFC, byte-level), then the 14 Qwen2-VL special tokens appended at the end in
  their real order (as in the real vocabulary, where they follow the BPE ranks). Any text
  round-trips (all 256 bytes are in the alphabet); task text is short in tokens.
* :func:`policy_config` / :func:`judge_config`: `config.json` dicts of the real
  architectures in the transformers 5.x layout, with vocab size and special-token ids read
  from the tokenizer.
* :func:`build_tiny_assets`: writes all of it under `run_dir/tiny_assets`, random weights via
  `models.from_config` + `Model.save_pretrained`; reused when the manifest's hash of the spec
  (seed, sizes, task, this code) and of every file matches.

The Qwen2-VL chat template below is copied verbatim from the Qwen2-VL tokenizer files
(Alibaba Cloud, Qwen team; Apache-2.0).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pr1_jax.tiny import synthetic
from pr1_jax.data.config import DEFAULT_FORMAT_PROMPT, DataConfig
from pr1_jax.judge import DEFAULT_QUESTION_TEMPLATE, DEFAULT_SYSTEM_PROMPT, JudgeConfig

ASSET_VERSION = 1

# Qwen2-VL chat template, verbatim (Apache-2.0, Alibaba Cloud / Qwen team).
QWEN2_VL_CHAT_TEMPLATE = (
        "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
        "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
        "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string "
        "%}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
        "content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = "
        "image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif "
        "%}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content "
        "%}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value "
        "}}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ "
        "content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt "
        "%}<|im_start|>assistant\n{% endif %}"
)

# The Qwen2-VL special tokens in their real order (real ids 151643..151656).
SPECIAL_TOKENS = (
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
        "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
        "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# Qwen2's pre-tokenizer split (contractions, letter runs, single digits, punctuation, spaces).
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")

TOKENIZER_CONFIG = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "bos_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
}

# ---- the tiny judge's prompt ---------------------------------------------------------------

# A short prompt for the tiny judge: the real judge's wording costs ~60 tokens a prompt, which a
# 2-core warm start pays on every step. The statement comes last, right before the verdict, and
# the system turn avoids the cue words of the fact sentences (" a", " in", ":"; the template's
# default "You are a helpful assistant." has " a"). It is read through the same
# `Judge.prompt_ids` as any judge prompt.
TINY_JUDGE_SYSTEM = "You judge responses."
TINY_JUDGE_TEMPLATE = "{response}\nDoes the response state this?\n{statement}"


def judge_prompt_config(**overrides) -> JudgeConfig:
    """The JudgeConfig of the embedded default: the short prompt above, one-token "yes"/"no"
    answers and buckets that fit the synthetic task's responses (a warm-start response with its
    3 annotations packs in < 96 tokens). `warm_start_judge` trains the judge on this prompt, so
    the run's judge must use the same one."""
    kw = dict(yes_tokens=("yes",), no_tokens=("no",), system_prompt=TINY_JUDGE_SYSTEM,
              question_template=TINY_JUDGE_TEMPLATE, length_buckets=(64, 128, 256), annotation_buckets=(1, 2, 4),
              max_response_tokens=192)
    kw.update(overrides)
    return JudgeConfig(**kw)


# ---- tokenizer ---------------------------------------------------------------------------

def tokenizer_corpus(seed: int = 0, n: int = 2000, task: synthetic.TaskConfig = synthetic.TaskConfig()
                     ) -> list[str]:
    """Text the tiny models will read and write: the chat roles and system prompts, every
    question type's problem text, warm-start responses, annotations and judge prompts.
    Deterministic in (seed, n, task)."""
    rng = np.random.default_rng([int(seed), 0x70C])
    texts = ["system\nYou are a helpful assistant.\n", "user\n", "assistant\n", DEFAULT_FORMAT_PROMPT]
    all_q = synthetic.QUESTIONS
    for i in range(n):
        q = all_q[i % len(all_q)]
        fig = synthetic.make_figure(rng, task)
        # every prompt has these turns (chat-template text between the special tokens)
        texts.extend(["system\nYou are a helpful assistant.", "\nuser\n", "\nassistant\n", TINY_JUDGE_SYSTEM])
        texts.append(synthetic.question_text(q, task))
        texts.append(DEFAULT_FORMAT_PROMPT)
        texts.append(synthetic.sft_response(rng, q, task, figure=fig, p_true=0.5))
        texts.extend(synthetic.annotations(fig))
    texts.append(DEFAULT_SYSTEM_PROMPT)
    # every fact sentence any task config can make (other palettes, counts up to 16), twice
    every = {"count": range(1, len(synthetic.NUMBER_WORDS)), "color": synthetic.PALETTE, "kind": synthetic.KINDS}
    texts.extend(2 * [synthetic.fact_sentence(a, v) for a, vs in every.items() for v in vs])
    for response, annotation, label in synthetic.judge_pairs(rng, n, task):
        # The judge's own prompt (pr1_jax.judge), so it encodes in few tokens.
        texts.append(DEFAULT_QUESTION_TEMPLATE.replace("{response}", response).replace("{statement}", annotation))
        texts.append(TINY_JUDGE_TEMPLATE.replace("{response}", response).replace("{statement}", annotation))
        texts.append(["no", "yes"][label])  # a verdict alone, as a chat judge's reply starts
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A `tokenizers.Tokenizer`: Qwen2-style byte-level BPE with `vocab_size` tokens in all
    (BPE ranks, then the special tokens). Deterministic in (texts, vocab_size)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def save_tokenizer_dir(tok, out_dir: str | os.PathLike) -> Path:
    """A Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json,
    chat_template.jinja) that `pr1_jax.data.processing.load_tokenizer` loads like a checkpoint's."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE)
    return out


# ---- model configs -----------------------------------------------------------------------

def _token_id(tokenizer: Any, token: str) -> int:
    """Id of `token` in a transformers tokenizer or a `tokenizers.Tokenizer`."""
    tid = (tokenizer.token_to_id(token) if hasattr(tokenizer, "token_to_id")
           else tokenizer.convert_tokens_to_ids(token))
    if tid is None or (getattr(tokenizer, "unk_token_id", None) is not None and tid == tokenizer.unk_token_id):
        raise ValueError(f"tokenizer has no {token} token")
    return int(tid)


def _vocab_size(tokenizer: Any) -> int:
    if hasattr(tokenizer, "get_vocab_size"):
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return len(tokenizer)


def _text_dict(tokenizer, *, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
               intermediate_size: int) -> dict:
    return {
            "vocab_size": _vocab_size(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "bos_token_id": None,
            "eos_token_id": _token_id(tokenizer, "<|im_end|>"),
            "pad_token_id": _token_id(tokenizer, "<|endoftext|>"),
    }


ARCHITECTURES = ("qwen2", "qwen3")


def _special_ids(tokenizer, text: dict) -> dict:
    return {
            "image_token_id": _token_id(tokenizer, "<|image_pad|>"),
            "video_token_id": _token_id(tokenizer, "<|video_pad|>"),
            "vision_start_token_id": _token_id(tokenizer, "<|vision_start|>"),
            "vision_end_token_id": _token_id(tokenizer, "<|vision_end|>"),
            "eos_token_id": text["eos_token_id"],
            "pad_token_id": text["pad_token_id"],
            "tie_word_embeddings": False,
    }


def policy_config(tokenizer, *, architecture: str = "qwen2", hidden_size: int = 128, num_layers: int = 2,
                  num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 256, vision_depth: int = 2,
                  vision_width: int = 64, vision_heads: int = 4) -> dict:
    """HF `config.json` of a tiny Qwen2-VL, or Qwen3-VL with `architecture` "qwen3" (transformers
    5.x layout). M-RoPE sections keep the real model's split of head_dim/2 (Qwen2-VL 1/4 : 3/8 : 3/8,
    real 16, 24, 24 of 64; Qwen3-VL 24, 20, 20 of 64, interleaved)."""
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    text = _text_dict(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, intermediate_size=intermediate_size)
    if architecture == "qwen3":
        h = half * 20 // 64
        text.update(model_type="qwen3_vl_text", head_dim=head_dim,
                    rope_parameters={"rope_type": "default", "mrope_section": [half - 2 * h, h, h],
                                     "mrope_interleaved": True, "rope_theta": 10000.0})
        # DeepStack from the first block (the real 8B: blocks 8, 16, 24 of 27); a 4x4 learned
        # position grid (the real one is 48x48, for 768-pixel images).
        vision = {"model_type": "qwen3_vl_vision", "depth": vision_depth, "hidden_size": vision_width,
                  "intermediate_size": 2 * vision_width, "num_heads": vision_heads, "out_hidden_size": hidden_size,
                  "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
                  "temporal_patch_size": 2, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]}
        return {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
                "text_config": text, "vision_config": vision, **_special_ids(tokenizer, text)}
    t = half // 4
    h = (half - t) // 2
    mrope = [t, h, half - t - h]
    text.update(model_type="qwen2_vl_text",
                rope_parameters={"rope_type": "default", "type": "mrope", "mrope_section": mrope,
                                 "rope_theta": 10000.0})
    return {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "text_config": text,
            "vision_config": {
                    "model_type": "qwen2_vl_vision",
                    "depth": vision_depth,
                    "embed_dim": vision_width,
                    "hidden_size": hidden_size,  # merger output = text width
                    "num_heads": vision_heads,
                    "mlp_ratio": 2,
                    "hidden_act": "quick_gelu",
                    "in_channels": 3,
                    "patch_size": 14,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
            },
            **_special_ids(tokenizer, text),
    }


def judge_config(tokenizer, *, architecture: str = "qwen2", hidden_size: int = 128, num_layers: int = 2,
                 num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 256) -> dict:
    """HF `config.json` of a tiny Qwen2 or Qwen3 (`architecture`; text only) sharing the policy's tokenizer."""
    text = _text_dict(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, intermediate_size=intermediate_size)
    arch = "Qwen3ForCausalLM" if architecture == "qwen3" else "Qwen2ForCausalLM"
    text.update(model_type=architecture, architectures=[arch],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if architecture == "qwen3":
        text["head_dim"] = hidden_size // num_heads
    return text


# ---- assets ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TinyAssets:
    """Paths of the built assets (all strings, absolute)."""

    root: str
    tokenizer: str  # HF tokenizer directory
    policy: str  # HF Qwen2-VL (Qwen3-VL) checkpoint directory
    judge: str  # HF Qwen2 (Qwen3) checkpoint directory
    train: str  # JSONL
    val: str  # JSONL
    image_size: int = synthetic.TaskConfig.image_size  # the task's canvas side (pixels)
    architecture: str = "qwen2"  # see ARCHITECTURES

    def data_config(self, split: str = "train", **overrides) -> DataConfig:
        """A DataConfig reading one split with the tiny tokenizer (keys of the synthetic JSONL),
        sized for the tiny task: images kept at their own size (min = max pixels = the canvas,
        so a 56 px figure is 16 patches, 4 image tokens, instead of the paper's 9216-patch
        budget per image; the patch budget says so, since pixel bounds alone must also admit
        the thin images smart_resize could make of them) and prompts of at most 128 tokens
        (the task's are ~90). Qwen3-VL resizes in 32-pixel units: the canvas rounded up to them
        (56 -> 64 px, 16 patches too)."""
        qwen3 = self.architecture == "qwen3"
        side = -(-self.image_size // 32) * 32 if qwen3 else self.image_size
        patch = 16 if qwen3 else 14
        kw = dict(paths={"train": self.train, "val": self.val}[split], tokenizer_path=self.tokenizer,
                  image_column="image", annotations_column="annotations",
                  image_processor="qwen3_vl" if qwen3 else "qwen2_vl",
                  min_pixels=side ** 2, max_pixels=side ** 2, max_patches_per_record=(side // patch) ** 2,
                  max_prompt_length=128, length_buckets=(64, 96, 128))
        kw.update(overrides)
        return DataConfig(**kw)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spec_hash_of(spec: dict, *code: str | os.PathLike) -> str:
    """Hash of everything the assets (or what is built from them) are a function of, this
    module's and the task's code and the `code` files included (so a code change rebuilds them
    rather than reusing stale files)."""
    h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for mod in (synthetic.__file__, __file__, *code):
        h.update(Path(mod).read_bytes())
    return h.hexdigest()


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def _cached(root: Path, spec_hash: str) -> bool:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        return manifest["spec_hash"] == spec_hash and manifest["files"] == _file_hashes(root)
    except (OSError, ValueError, KeyError):
        return False


def _paths(root: Path, task: synthetic.TaskConfig, architecture: str) -> TinyAssets:
    r = root.resolve()
    return TinyAssets(root=str(r), tokenizer=str(r / "tokenizer"), policy=str(r / "policy"),
                      judge=str(r / "judge"), train=str(r / "data" / "train.jsonl"),
                      val=str(r / "data" / "val.jsonl"), image_size=task.image_size, architecture=architecture)


def build_tiny_assets(run_dir: str | os.PathLike, seed: int = 0, *, task: synthetic.TaskConfig = synthetic.TaskConfig(),
                      n_train: int = 2000, n_val: int = 200, vocab_size: int = 512,
                      corpus_size: int = 2000, policy: dict | None = None, judge: dict | None = None,
                      architecture: str = "qwen2") -> TinyAssets:
    """Write (or reuse) `run_dir/tiny_assets/{tokenizer,policy,judge,data}`.

    policy / judge: keyword overrides for :func:`policy_config` / :func:`judge_config`.
    architecture: "qwen2" (a Qwen2-VL policy, a Qwen2 judge) or "qwen3" (Qwen3-VL, Qwen3).
    Built in a temporary directory and moved into place, so an interrupted build never leaves
    a half-written set that looks valid; reused when `manifest.json` matches the spec and files.
    """
    import models

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    spec = dict(architecture=architecture, version=ASSET_VERSION, seed=int(seed), task=dataclasses.asdict(task), n_train=n_train,
                n_val=n_val, vocab_size=vocab_size, corpus_size=corpus_size, policy=policy or {},
                judge=judge or {})
    spec_hash = spec_hash_of(spec)
    root = Path(run_dir) / "tiny_assets"
    if _cached(root, spec_hash):
        return _paths(root, task, architecture)

    tmp = Path(run_dir) / f"tiny_assets.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = train_tokenizer(tokenizer_corpus(seed, corpus_size, task), vocab_size)
    save_tokenizer_dir(tok, tmp / "tokenizer")
    policy_dict = policy_config(tok, architecture=architecture, **(policy or {}))
    models.from_config(policy_dict, seed).save_pretrained(tmp / "policy")
    models.from_config(judge_config(tok, architecture=architecture, **(judge or {})), seed + 1).save_pretrained(tmp / "judge")
    synthetic.write_dataset(tmp / "data", n_train, seed, "train", task)
    synthetic.write_dataset(tmp / "data", n_val, seed, "val", task)
    manifest = dict(spec_hash=spec_hash, spec=spec, files=_file_hashes(tmp))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    try:
        os.replace(tmp, root)
    except OSError:  # another process put its (identical) build there first
        shutil.rmtree(tmp, ignore_errors=True)
        if not _cached(root, spec_hash):
            raise
    return _paths(root, task, architecture)


def param_count(path_or_model) -> int:
    """Number of parameters of a saved checkpoint directory or a `models.Model`."""
    import jax

    import models

    m = models.load_pretrained(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(m.params)))
