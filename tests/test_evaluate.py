import json

import pytest
import torch

from qlrlora.config import AdapterConfig, ModelConfig
from qlrlora.errors import QLRError
from qlrlora.evaluate import Question, evaluate_mc, load_mc_tasks, main, score_questions
from qlrlora.model import inject_adapters, load_backbone
from tests.conftest import TINY_LLAMA

QUESTIONS = [
    Question("letters", "Is fire hot?\nAnswer: ", ["A", "B"], 0),  # one token per choice: one pass scores both
    Question("letters", "Pick one.\nAnswer: ", ["A", "B", "C"], 2),
    Question("words", "The sky is", [" blue", " green", " plaid"], 0),  # several tokens per choice
]


def fp32_tiny():
    torch.manual_seed(0)
    return load_backbone(ModelConfig(init_config=TINY_LLAMA, quantize="none", dtype="float32"))


def by_hand(model, tokenizer, question):
    """sum_k log p(choice token k | prompt, earlier choice tokens), one full forward pass per choice."""
    scores = []
    for choice in question.choices:
        context = tokenizer(question.prompt)["input_ids"]
        whole = tokenizer(question.prompt + choice)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole], device=model.device)).logits[0].float(), dim=-1)
        scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
    return scores


def test_scores_match_logits_computed_by_hand():
    model, tokenizer = fp32_tiny()
    expected = [by_hand(model, tokenizer, q) for q in QUESTIONS]
    for batch_size in (1, 2, 8):  # padding and batching must not change a score
        got = score_questions(model, tokenizer, QUESTIONS, batch_size=batch_size, progress=False)
        for g, e in zip(got, expected):
            assert g == pytest.approx(e, abs=1e-4)


def test_accuracy_follows_the_best_scoring_choice():
    model, tokenizer = fp32_tiny()
    scores = [by_hand(model, tokenizer, q) for q in QUESTIONS]
    best = [max(range(len(q.choices)), key=s.__getitem__) for q, s in zip(QUESTIONS, scores)]
    right = {"t": [Question("t", q.prompt, q.choices, b) for q, b in zip(QUESTIONS, best)]}
    wrong = {"t": [Question("t", q.prompt, q.choices, (b + 1) % len(q.choices)) for q, b in zip(QUESTIONS, best)]}
    assert evaluate_mc(model, tokenizer, right, progress=False) == {
        "tasks": {"t": {"accuracy": 1.0, "correct": 3, "total": 3}}, "average": 1.0}
    assert evaluate_mc(model, tokenizer, wrong, progress=False)["average"] == 0.0


def write_questions(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_question_files_tasks_and_limits(tmp_path):
    write_questions(tmp_path / "piqa.jsonl", [{"prompt": f"q{i}", "choices": [" A", " B"], "gold": i % 2} for i in range(5)])
    write_questions(tmp_path / "mixed.jsonl", [{"task": "arc", "prompt": "q", "choices": [" A", " B"], "gold": 1}])
    tasks = load_mc_tasks(str(tmp_path), max_per_task=3)
    assert {t: len(q) for t, q in tasks.items()} == {"arc": 1, "piqa": 3}
    assert list(load_mc_tasks(str(tmp_path), tasks=["piqa"])) == ["piqa"]
    with pytest.raises(QLRError, match="eval.tasks: no questions for siqa"):
        load_mc_tasks(str(tmp_path), tasks=["siqa"])


@pytest.mark.parametrize(
    "row, message",
    [({"choices": [" A", " B"], "gold": 0}, "field 'prompt' is missing"),
     ({"prompt": "q", "choices": [" A"], "gold": 0}, "field 'choices' must list at least two strings"),
     ({"prompt": "q", "choices": [" A", " B"], "gold": 2}, "field 'gold' must index 'choices', got 2")],
)
def test_bad_question_rows_name_file_and_line(tmp_path, row, message):
    path = write_questions(tmp_path / "bad.jsonl", [{"prompt": "q", "choices": [" A", " B"], "gold": 0}, row])
    with pytest.raises(QLRError, match=rf"bad\.jsonl: line 2: {message}"):
        load_mc_tasks(str(path))


def test_cli_base_training_adapter_and_exported_peft_adapter_agree(tmp_path, capsys):
    from qlrlora.checkpoint import save_adapter
    from qlrlora.export import export_peft

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps({"model": {"init_config": TINY_LLAMA, "quantize": "none", "dtype": "float32"},
                                  "adapter": {"r_max": 8, "init_rank": 5, "dtype": "float32"},
                                  "rank": {"mode": "penalty"}, "data": {"dataset": "unused.jsonl"}}))
    model, _ = load_backbone(ModelConfig(init_config=TINY_LLAMA, quantize="none", dtype="float32"))
    config = AdapterConfig(r_max=8, init_rank=5, dtype="float32")
    layers = inject_adapters(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(std=0.5)
    save_adapter(tmp_path / "run", layers, config)
    export_peft(layers, tmp_path / "peft")
    data = write_questions(tmp_path / "q.jsonl", [{"prompt": q.prompt, "choices": q.choices, "gold": q.gold} for q in QUESTIONS])

    results = {}
    for name, extra in (("base", []), ("lrlora", ["--adapter", tmp_path / "run"]), ("peft", ["--peft-adapter", tmp_path / "peft"])):
        out = tmp_path / f"{name}.json"
        assert main(["--recipe", str(recipe), "--data", str(data), "--output", str(out), *map(str, extra)]) == 0
        results[name] = json.loads(out.read_text())
    assert results["lrlora"] == results["peft"]
    assert "average" in capsys.readouterr().out


def test_a_peft_adapter_that_does_not_fit_the_base_is_one_line(tmp_path):
    from qlrlora.evaluate import load_peft_adapter
    from qlrlora.export import export_peft

    other = {**TINY_LLAMA, "hidden_size": 32, "intermediate_size": 64}
    model, _ = load_backbone(ModelConfig(init_config=other, quantize="none", dtype="float32"))
    layers = inject_adapters(model, AdapterConfig(r_max=4, init_rank=2, dtype="float32"))
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_()
    export_peft(layers, tmp_path / "peft")
    base, _ = fp32_tiny()
    with pytest.raises(QLRError, match=r"does not fit this base model: .*lora_A.* has shape"):
        load_peft_adapter(base, tmp_path / "peft")
    (tmp_path / "peft" / "adapter_model.safetensors").unlink()
    with pytest.raises(QLRError, match="has no adapter_model.safetensors"):
        load_peft_adapter(base, tmp_path / "peft")


def test_the_table_says_how_large_a_change_is_noise():
    from qlrlora.evaluate import format_results, standard_error

    results = {"tasks": {"a": {"accuracy": 0.5, "correct": 25, "total": 50},
                         "b": {"accuracy": 0.8, "correct": 40, "total": 50}}, "average": 0.65}
    expected = ((0.25 / 50 + 0.16 / 50) / 4) ** 0.5
    assert standard_error(results) == pytest.approx(expected)
    assert f"{2 * expected:.3f} is noise" in format_results(results, results)
