"""`--model tiny`: a tiny Llama made on this machine, for clusters without a model hub.

Random weights (hidden 128, 2 layers, 2 heads: head_dim 64, which vLLM's CPU
attention accepts; 16 it rejects) and a byte-level BPE tokenizer trained on the
spot on generated text. Made once into a cache directory (mode 0700) and reused;
the directory is written under a temporary name and renamed, so a crash never
leaves a half-made model behind.

    python -m controller.engines.tiny_model [--dir DIR]   # prints the model's path
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

MODEL_NAME = "tiny-llama-v1"
SERVED_NAME = "tiny"
VOCAB_SIZE = 2048
MAX_POSITIONS = 1024
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = ("the cluster node head worker ray engine serve token request model replica state "
         "drain join health epoch coordinator gateway latency stream answer question machine "
         "alpha beta gamma delta one two three four five six seven eight nine ten").split()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llm-controller" / "models"


def model_path(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / MODEL_NAME


def _corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) for _ in range(lines)]


def _make(target: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = MAX_POSITIONS
    fast.save_pretrained(target)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(target, safe_serialization=True)
    (target / "tiny_model.json").write_text(json.dumps({"name": MODEL_NAME, "served_name": SERVED_NAME}) + "\n")


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """Return the tiny model's directory, making it first if it is not there."""
    target = model_path(cache_dir)
    if (target / "tiny_model.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(target.parent, 0o700)
    work = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
    try:
        _make(work)
        os.chmod(work, 0o700)
        try:
            os.rename(work, target)
        except OSError:
            if not (target / "tiny_model.json").exists():  # not made by a concurrent maker
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.engines.tiny_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="cache directory (default: ~/.cache/llm-controller/models)")
    args = parser.parse_args(argv)
    print(ensure_tiny_model(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
