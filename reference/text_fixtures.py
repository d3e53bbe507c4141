"""Token-id fixtures for the text encoder parity test (tests/parity_text_encoder.rs).

Runs diffusers' own tokenization path, `Flux2KleinPipeline._get_qwen3_prompt_embeds`, on the
tiny model (its text encoder is only used to capture the `input_ids`/`attention_mask` the
pipeline feeds it) with the real Qwen3 tokenizer in tests/fixtures/tokenizer/, and writes
tests/fixtures/text/tokens.json:

    {"max_len": 512, "pad_id": 151643, "versions": {...},
     "prompts": [{"name", "prompt", "template", "ids" (unpadded, after truncation),
                  "n_real", "n_untruncated", "truncated"}]}

Usage (repo root): ~/.cache/flux2-klein-refenv/bin/python reference/text_fixtures.py
"""
import json
import pathlib

import torch

torch.set_num_threads(1)

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import Flux2KleinPipeline  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
MAX_LEN = 512

PROMPTS = [
    ("gifu", 'A cat holding a sign that says "Gifu AI Study Group"'),
    ("cjk", '一只猫举着写有"岐阜AI学习会"的牌子，东京の夜景'),
    ("emoji_ws", "  🐱‍👤 neon\tcat  \n\n  with   🎌🗾 flags…  \r\n ☕️ café  naïve  "),
    ("empty", ""),
    (
        "long",
        " ".join(
            f"Sentence {i}: a watercolor fox walks through the snowy Gifu mountains at dawn."
            for i in range(60)
        ),
    ),
]


def main():
    pipe = Flux2KleinPipeline.from_pretrained(FIX / "models" / "tiny-w0", torch_dtype=torch.float32)
    tokenizer = type(pipe.tokenizer).from_pretrained(FIX / "tokenizer")
    captured = {}

    def hook(_module, _args, kwargs):
        captured["input_ids"] = kwargs["input_ids"].clone()
        captured["attention_mask"] = kwargs["attention_mask"].clone()

    pipe.text_encoder.register_forward_pre_hook(hook, with_kwargs=True)

    out = []
    for name, prompt in PROMPTS:
        with torch.no_grad():
            Flux2KleinPipeline._get_qwen3_prompt_embeds(
                text_encoder=pipe.text_encoder,
                tokenizer=tokenizer,
                prompt=prompt,
                max_sequence_length=MAX_LEN,
            )
        ids = captured["input_ids"][0].tolist()
        mask = captured["attention_mask"][0].tolist()
        n_real = int(sum(mask))
        assert mask == [1] * n_real + [0] * (MAX_LEN - n_real), "padding is not right-sided"
        assert ids[n_real:] == [tokenizer.pad_token_id] * (MAX_LEN - n_real)
        template = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        n_untruncated = len(tokenizer(template)["input_ids"])
        out.append(
            {
                "name": name,
                "prompt": prompt,
                "template": template,
                "ids": ids[:n_real],
                "n_real": n_real,
                "n_untruncated": n_untruncated,
                "truncated": max(0, n_untruncated - MAX_LEN),
            }
        )
        print(f"{name}: {n_real} real tokens, {n_untruncated} before truncation")

    doc = {
        "max_len": MAX_LEN,
        "pad_id": tokenizer.pad_token_id,
        "tokenizer_class": type(tokenizer).__name__,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        "prompts": out,
    }
    dst = FIX / "text"
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokens.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    print("wrote", dst / "tokens.json")


if __name__ == "__main__":
    main()
