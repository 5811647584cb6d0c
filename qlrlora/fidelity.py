"""How faithfully each way out of training reproduces the trained model (docs/export.md).

For one run: the trained model (its base as the recipe loads it, with the LR-LoRA adapter), and each
variant a user deploys: the PEFT and portable exports on the same base, the GGUF adapter in llama.cpp,
and the merged checkpoints (bf16; NF4 by each merge method). For each: multiple-choice accuracy on
the given questions and the share of answers that differ from the reference's (flips), and, against the
trained model on the first `closeness_prompts` of the
questions' prompts at every position, the mean KL divergence of the next-token distributions, the
largest logit difference, and the perplexity of those prompts.

llama.cpp runs the base unquantized (f32 GGUF), so its row is compared with the trained adapter on
the same unquantized base (`trained on f32 base`), which isolates the adapter from the base's NF4.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from qlrlora.errors import QLRError


@dataclass
class Row:
    variant: str
    accuracy: float
    flips: float  # share of questions whose predicted answer differs from the reference's
    kl: float | None
    max_logit_diff: float | None
    perplexity: float
    reference: str


def prompt_logits(model, tokenizer, prompts: list[str], every_position: int) -> list[torch.Tensor]:
    """Logits at every position for the first `every_position` prompts, at the last position for the rest."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = tokenizer(prompt, return_tensors="pt").to(device)
            logits = model(**ids).logits[0].float().cpu()
            out.append(logits if i < every_position else logits[-1:].clone())  # a view would keep it all
    return out


def compare(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """Mean KL(reference || logits) over all positions, and the largest absolute logit difference."""
    kls, diff = [], 0.0
    for got, ref in zip(logits, reference):
        p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
        kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
        diff = max(diff, float((got - ref).abs().max()))
    return sum(kls) / len(kls), diff


def perplexity(logits: list[torch.Tensor], token_lists: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for scores, tokens in zip(logits, token_lists):
        logp = torch.log_softmax(scores[:-1], -1)
        target = torch.tensor(tokens[1:], dtype=torch.long)
        nll -= float(logp[torch.arange(len(target)), target].sum())
        count += len(target)
    return math.exp(nll / max(count, 1))


def predictions(logits: list[torch.Tensor], choices: list[list[int]]) -> list[int]:
    """The chosen answer of every question when every choice is one token after the prompt (the commonsense
    format): the choice whose token is likeliest at the prompt's last position."""
    return [max(range(len(ids)), key=lambda j: float(scores[-1][ids[j]])) for scores, ids in zip(logits, choices)]


def choice_tokens(tokenizer, question) -> list[int]:
    ids = []
    context = tokenizer(question.prompt)["input_ids"]
    for choice in question.choices:
        whole = tokenizer(question.prompt + choice)["input_ids"]
        if whole[: len(context)] != context or len(whole) != len(context) + 1:
            raise QLRError("fidelity: every choice must be one token after its prompt (the commonsense format)")
        ids.append(whole[-1])
    return ids


def measure(run_dir: Path, questions: list, methods: tuple[str, ...] = ("naive", "original"),
            with_llamacpp: bool = True, closeness_prompts: int = 32) -> list[Row]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlrlora.checkpoint import load_adapter
    from qlrlora.config import ModelConfig
    from qlrlora.export import adapters_from_run, base_model_of, vllm_rank, write_peft, write_portable
    from qlrlora.merge import _recorded_model, merge
    from qlrlora.model import load_backbone
    from qlrlora.typed_yaml import build_dataclass

    base_dir = base_model_of(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    prompts = [q.prompt for q in questions]
    token_lists = [tokenizer(p)["input_ids"] for p in prompts]
    choices = [choice_tokens(tokenizer, q) for q in questions]
    model_config = build_dataclass(ModelConfig, {**_recorded_model(run_dir), "name_or_path": str(base_dir),
                                                 "init_config": None, "gguf_file": None}, "model", str(run_dir))
    rows = []

    n = min(closeness_prompts, len(prompts))

    def logits_of(model):
        return prompt_logits(model, tokenizer, prompts, n)

    def row(name, logits, reference, reference_name):
        kl, diff = compare(logits[:n], reference[:n])
        chosen, expected = predictions(logits, choices), predictions(reference, choices)
        accuracy = sum(c == q.gold for c, q in zip(chosen, questions)) / len(questions)
        flips = sum(c != e for c, e in zip(chosen, expected)) / len(questions)
        rows.append(Row(name, accuracy, flips, kl, diff, perplexity(logits[:n], token_lists[:n]), reference_name))

    base, _ = load_backbone(model_config)
    base_logits = logits_of(base)
    trained_model = base
    load_adapter(run_dir, trained_model)
    trained = logits_of(trained_model)
    row("base (no adapter)", base_logits, trained, "trained")
    row("trained (LR-LoRA adapter)", trained, trained, "trained")
    del trained_model, base
    adapters, _ = adapters_from_run(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_peft(adapters, tmp / "peft", str(base_dir))
        write_portable(adapters, tmp / "portable", str(base_dir), vllm_rank(max(a.rank for a in adapters.values())))
        from peft import PeftModel

        for name in ("peft", "portable"):
            model = PeftModel.from_pretrained(load_backbone(model_config)[0], str(tmp / name)).eval()
            row(f"{name} export (PEFT)", logits_of(model), trained, "trained")
        f32 = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        for layer in load_adapter(run_dir, f32)[0].values():
            layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), layer.lora_B.data.float()
        reference = logits_of(f32.eval())
        del f32
        row("trained on f32 base", reference, trained, "trained")
        if with_llamacpp:
            from qlrlora.export import write_gguf
            from qlrlora.llamacpp import gguf_logits

            write_gguf(adapters, tmp, base_dir)
            row("GGUF adapter (llama.cpp)", gguf_logits(base_dir, tmp / "adapter.gguf", token_lists, n), reference,
                "trained on f32 base")
        merge(run_dir, tmp / "bf16", "bfloat16")
        merged = AutoModelForCausalLM.from_pretrained(str(tmp / "bf16"), dtype=torch.bfloat16).eval()
        row("merged bf16", logits_of(merged), reference, "trained on f32 base")
        for method in methods:
            merge(run_dir, tmp / method, "nf4", method)
            model = AutoModelForCausalLM.from_pretrained(str(tmp / method), dtype=torch.bfloat16).eval()
            row(f"merged nf4 ({method})", logits_of(model), trained, "trained")
    return rows


def table(rows: list[Row], questions: int, closeness_prompts: int = 32) -> str:
    lines = [(f"| variant | accuracy ({questions} questions) | answers flipped | KL to reference | max logit diff | "
             "perplexity | reference |"), "| --- | --- | --- | --- | --- | --- | --- |"]
    lines.insert(0, f"KL, logit difference and perplexity at every position of the first {closeness_prompts} "
                    "prompts; accuracy on all questions.\n")
    for r in rows:
        kl = "" if r.kl is None else f"{r.kl:.2e}"
        diff = "" if r.max_logit_diff is None else f"{r.max_logit_diff:.3f}"
        lines.append(f"| {r.variant} | {r.accuracy:.3f} | {r.flips:.3f} | {kl} | {diff} | {r.perplexity:.3f} | "
                     f"{r.reference} |")
    return "\n".join(lines)
