"""sftjax-data on the training configuration: the report, its JSON form, the eval split, one-line user errors."""

import json

from sftjax.cli.data import main
from tests.data.conftest import make_tokenizer_dir
from tests.data.test_formats import write_jsonl

CHAT = [{"messages": [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "fine"}]}]


def test_report_json_and_marks(tmp_path, capsys):
    tok = make_tokenizer_dir(tmp_path, "qwen_chatml")
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT * 3)
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Hello", "completion": " world"},
                                             {"prompt": "x", "completion": ""}])
    datasets = f"data.train=[{{path:'{chat}'}},{{path:'{pc}'}}]"
    assert main([f"model.tokenizer={tok}", datasets, "data.seq_len=64", "data.append_eos=false", "--json",
                 "--show", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    chat_task, pc_task = result["train"]["tasks"]
    assert (chat_task["records"], chat_task["kept"], pc_task["kept"], pc_task["dropped_empty_mask"]) == (3, 3, 1, 1)
    assert chat_task["examples"][0]["text"].endswith("assistant\n[[fine<|im_end|>\n]]")
    assert pc_task["examples"][0]["text"] == "Hello[[ world]]"
    assert 0 < result["train"]["packing_efficiency"] <= 1 and "eval" not in result
    # The model directory shorthand and the eval split, as sftjax-train reads them.
    assert main([f"model.tokenizer={tok}", f"data={chat}", "data.seq_len=64", "data.eval_fraction=0.34"]) == 0
    out = capsys.readouterr().out
    assert "== train" in out and "== eval" in out and "2 in this split" in out and "1 in this split" in out


def test_user_errors_are_one_line(tmp_path, capsys):
    tok = make_tokenizer_dir(tmp_path, "qwen_chatml")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    for args, message in [
        ([f"model.tokenizer={tok}", f"data={bad}"], f"{bad}:1: messages[0] has unknown role 'robot'"),
        ([f"data={bad}"], "model.path='tiny-llama': no tokenizer.json there"),
        ([f"model.tokenizer={tok}", "data.seq_lenn=3"], "Could not override 'data.seq_lenn'"),
        (["--show", "many"], "--show 'many': expected a number"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and message in err, err


def test_preference_pairs_shown_with_both_completions_marked(tmp_path, capsys):
    """A pair's chosen and rejected sequences, each with its trained completion marked; identical pairs and pairs
    that do not fit a row counted."""
    tok = make_tokenizer_dir(tmp_path, "qwen_chatml")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": "Go away"},
        {"prompt": "same", "chosen": " x", "rejected": " x"},
        {"prompt": "long " * 40, "chosen": " a " * 40, "rejected": " b " * 40}])
    args = [f"model.tokenizer={tok}", f"data={pairs}", "data.seq_len=128", "data.over_long=drop", "--show", "1"]
    assert main([*args, "--json"]) == 0
    task = json.loads(capsys.readouterr().out)["train"]["tasks"][0]
    assert (task["records"], task["kept"], task["dropped_identical"], task["dropped_too_long"]) == (3, 1, 1, 1)
    shown = task["examples"][0]
    assert shown["chosen"].endswith("<|im_start|>assistant\n[[Hello<|im_end|>\n]]")
    assert shown["rejected"].endswith("<|im_start|>assistant\n[[Go away<|im_end|>\n]]")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3 preference pairs, 1 kept, dropped 1 with chosen = rejected + 1 not fitting a row of 128" in out
    assert "chosen:" in out and "rejected:" in out


def test_rl_prompts_shown_with_their_answers(tmp_path, capsys):
    """objective=grpo: the prompts the rollouts sample from (chat prompts with the generation prompt, an SFT file's
    prompt side), over-long ones truncated or dropped and counted by data.over_long, the held-out count."""
    tok = make_tokenizer_dir(tmp_path, "qwen_chatml")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": [{"role": "user", "content": "2+2="}], "answer": "4", "source": "x"},
        {"prompt": [{"role": "user", "content": "word " * 40}], "answer": "long"}])
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Hello", "completion": " world"}] * 4)
    common = [f"model.tokenizer={tok}", f"data.train=[{{path:'{prompts}'}},{{path:'{pc}'}}]", "objective=grpo",
              "objective.max_new_tokens=16", "data.seq_len=80", "--json", "--show", "1"]
    assert main(common + ["data.over_long=drop"]) == 0
    first, second = json.loads(capsys.readouterr().out)["prompts"]["tasks"]
    assert (first["read"], first["kept"], first["dropped"], first["truncated"]) == (2, 1, 1, 0)
    assert first["examples"][0]["prompt"].endswith("2+2=<|im_end|>\n<|im_start|>assistant\n")
    assert first["examples"][0]["answer"] == "4"
    assert (second["kept"], second["examples"][0]["answer"]) == (4, " world")
    assert main(common + ["data.over_long=truncate"]) == 0
    first = json.loads(capsys.readouterr().out)["prompts"]["tasks"][0]
    assert (first["kept"], first["truncated"], first["max_tokens"]) == (2, 1, 64)
    assert main(common[:-3] + ["data.over_long=error"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and f"{prompts}:2: the prompt has" in err, err


def test_report_names_the_mask_rule_of_each_chat(tmp_path, capsys):
    """A template that rewrites earlier turns is masked by search, and the report says so per task and example."""
    from tests.data.test_masking import COUNTED_CHATML

    tok = make_tokenizer_dir(tmp_path, "qwen_chatml")
    template = tmp_path / "counted.jinja"
    template.write_text(COUNTED_CHATML)
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT * 2)
    args = [f"model.tokenizer={tok}", f"data={chat}", "data.seq_len=64", "--show", "1"]
    assert main([*args, "--json"]) == 0
    [task] = json.loads(capsys.readouterr().out)["train"]["tasks"]
    assert task["mask_rules"] == {"per_turn": 2} and task["examples"][0]["rule"] == "per_turn"
    assert main([*args, f"data.chat_template={template}"]) == 0
    out = capsys.readouterr().out
    assert "chat masks: 2 by search (each assistant content found in the one render" in out
    assert ("mask rule search)\n2<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
            "[[fine<|im_end|>\n]]") in out


def test_real_qwen3_chat_from_sftjax_data_and_sftjax_train(tmp_path, capsys):
    """Qwen3's real template drops earlier reasoning: both commands mask its chats by search, as the report shows."""
    from tests.data.test_real_templates import REAL
    from tests.train.conftest import run_train

    tok = make_tokenizer_dir(tmp_path, "qwen_chatml")  # Qwen's control tokens
    messages = [{"role": "user", "content": "Say I"},
                {"role": "assistant", "content": "<think>\nfirst thought\n</think>\n\nI"},
                {"role": "user", "content": "And two?"},
                {"role": "assistant", "content": "<think>\nsecond thought\n</think>\n\nTwo."}]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}] * 4)
    args = [f"model.tokenizer={tok}", f"data={chat}", f"data.chat_template={REAL / 'qwen3.jinja'}",
            "data.seq_len=128"]
    assert main([*args, "--json", "--show", "1"]) == 0
    [task] = json.loads(capsys.readouterr().out)["train"]["tasks"]
    assert task["mask_rules"] == {"search": 4}
    assert task["examples"][0]["text"] == (
        "<|im_start|>user\nSay I<|im_end|>\n<|im_start|>assistant\n[[I<|im_end|>]]\n<|im_start|>user\nAnd two?"
        "<|im_end|>\n<|im_start|>assistant\n[[<think>\nsecond thought\n</think>\n\nTwo.<|im_end|>\n]]")
    done = run_train(*args, "trainer.max_steps=1", "trainer.batch_size=1", "trainer.devices=1", "model.path=tiny-llama",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert "data: chat 4 (chat masks: search 4)" in done.stdout + done.stderr
