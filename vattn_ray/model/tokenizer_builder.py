"""A deterministic, offline tokenizer for random checkpoints.

A byte-level BPE is trained with the `tokenizers` library on `corpus.txt` (shipped in the package),
then padded with reserved tokens so that it holds exactly the model's `vocab_size` ids: every id a
random model can emit decodes without error. The padding entries are ordinary vocabulary entries
(not "added tokens"), so a 128k vocabulary still loads in well under a second.
"""

from __future__ import annotations

import json
from importlib import resources

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# ids 0..6. "<|endoftext|>" is there because transformers loads any qwen2 checkpoint's tokenizer as
# Qwen2Tokenizer, which adds that token when missing, past the model's vocabulary.
SPECIAL_TOKENS = (BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>")
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
# Merges learned from the corpus; the corpus is small, so training stops well before this cap.
MAX_TRAINED_VOCAB = 4096

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus_text() -> str:
    """The training text embedded in the package."""
    return resources.files("vattn_ray.model").joinpath("corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train the byte-level BPE and pad it to exactly `vocab_size` ids."""
    min_size = len(SPECIAL_TOKENS) + 256  # specials + the byte alphabet
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} for a byte-level tokenizer, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, MAX_TRAINED_VOCAB),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(keepends=True), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)])
    return _pad_vocab(tok, vocab_size)


def _pad_vocab(tok: Tokenizer, vocab_size: int) -> Tokenizer:
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for i in range(len(SPECIAL_TOKENS)):  # the trainer puts specials first; ids are part of the API
        assert vocab[SPECIAL_TOKENS[i]] == i, "special tokens must hold the first ids"
    # Printable ASCII is its own byte-level symbol, so these names decode to themselves.
    next_id, n = len(vocab), 0
    while next_id < vocab_size:
        name = f"<|reserved_{n}|>"
        n += 1
        if name not in vocab:
            vocab[name] = next_id
            next_id += 1
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))


def save_tokenizer(out_dir: str, vocab_size: int, model_max_length: int) -> None:
    """Write a `PreTrainedTokenizerFast` directory (tokenizer.json + tokenizer_config.json)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size),
        bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=model_max_length, chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    tok.save_pretrained(out_dir)
