"""Pieces of the bundled tiny base model, built offline from a config.

A byte-level BPE tokenizer (digits split one per token, as Llama does) with
a chat template, a small Llama-architecture config, and a generated generic
corpus to pretrain on. `distft.stages.tiny_base` assembles them into a
pretrained HF directory that loads through the normal `from_pretrained` path.
"""

from __future__ import annotations

import random

from distft.data.task import QUESTIONS, SENTENCES, random_facts, render_sentence

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]

# `{% generation %}` markers let TRL's assistant-only masking work too; distft
# itself masks by rendering prefixes (see distft.data.formats).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% generation %} {{ m['content'] }}</s>{% endgeneration %}\n"
    "{% else %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Content follows its role marker after a space, and the generation prompt stops
# before that space, so an answer word is the same token (" bear") as in the prompt.

NOUNS = ["cat", "dog", "river", "teacher", "city", "garden", "machine", "letter", "window", "farmer", "book", "road"]
VERBS = ["sees", "likes", "finds", "paints", "follows", "builds", "opens", "carries", "counts", "reads"]
ADJS = ["small", "old", "green", "quiet", "bright", "busy", "cold", "happy", "long", "strange"]


COMPREHENSION = {
    "color": "what colour was it?",
    "animal": "what kind of animal?",
    "place": "where did they go?",
    "number": "how many friends?",
}


def _filler(rng: random.Random) -> str:
    return f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(ADJS)} {rng.choice(NOUNS)}."


FOLLOW_UPS = [
    "The {animal} was {color}.",
    "They all stayed in {place}.",
    "There were {number} friends in total.",
    "Everyone in {place} saw the {color} {animal}.",
    "The {number} friends liked the {animal}.",
]


def generic_corpus(n_docs: int = 4000, seed: int = 1) -> list[str]:
    """Short stories about animals, colours and cities.

    Follow-up sentences repeat facts from the opening sentence, so predicting
    them needs in-context retrieval: the base learns to copy from its context,
    the core skill that instruction tuning then builds on.
    """
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        facts = random_facts(rng)
        parts = [render_sentence(facts, rng.randrange(len(SENTENCES)))]
        parts += [f.format(**facts) for f in rng.sample(FOLLOW_UPS, rng.randint(1, 3))]
        if rng.random() < 0.5:
            parts.insert(rng.randint(1, len(parts)), _filler(rng))
        if rng.random() < 0.6:
            # Reading-comprehension lines, phrased unlike the instruction task: a tiny model
            # learns in-context retrieval from these within a few hundred steps, and from
            # repetition alone it does not (seen here: no copying after 700 steps).
            key = rng.choice(list(COMPREHENSION))
            parts.append(f"Q: {COMPREHENSION[key]} A: {facts[key]}.")
        docs.append(" ".join(parts))
    return docs


def train_tokenizer(texts: list[str], vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    extra = list(QUESTIONS.values())
    tok.train_from_iterator(texts + extra, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(tokenizer, hidden: int = 128, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def save_random_init(out_dir, seed: int = 0, corpus: list[str] | None = None, **config_kwargs) -> None:
    """A randomly initialised tiny Llama plus tokenizer, saved in HF format (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = train_tokenizer(corpus if corpus is not None else generic_corpus())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(tokenizer, **config_kwargs))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
