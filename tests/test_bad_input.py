"""Bad input: one line naming file, line and field; exit status 1; no output directory."""
import json
import shutil

import pytest
from util import run

from algos import rm, sft

GOOD = {"messages": [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "1+1=2"}]}
CASES = {  # name: (file content, what the one-line error must say)
    "malformed json": (json.dumps(GOOD) + "\n{\"messages\": [\n", ":2: malformed JSON"),
    "missing field": (json.dumps(GOOD) + "\n" + json.dumps({"prompt": "What is 1+1?"}) + "\n", ":2: missing field 'completion'"),
    "unknown role": (json.dumps({"messages": [{"role": "robot", "content": "hi"}, GOOD["messages"][1]]}) + "\n",
                     ":1: field 'messages[0].role' is 'robot'"),
    "no assistant turn": (json.dumps({"messages": GOOD["messages"][:1]}) + "\n", ":1: field 'messages' has no assistant turn"),
    "empty file": ("", ": no records (empty file)"),
    "mistyped field": (json.dumps({"prompt": 3, "completion": "x"}) + "\n", ":1: field 'prompt' must be str or list"),
}


@pytest.mark.parametrize("case", CASES)
def test_sft_bad_data(case, base, tmp_path):
    content, expected = CASES[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sft.main(sft.parse_args(["--data", str(path), "--output_dir", str(out)]))
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg and str(path) + expected in msg
    assert not out.exists()


def test_tokenizer_without_chat_template(base, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(base, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match=r"^error: tokenizer .* has no chat template") as e:
        sft.main(sft.parse_args(["--model", str(model), "--output_dir", str(tmp_path / "out")]))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("rec,expected", [
    ({"prompt": "What is 1+1?", "chosen": "1+1=2"}, ":1: missing field 'rejected'"),
    ({"prompt": "What is 1+1?", "chosen": "1+1=2", "rejected": "1+1=2"}, ":1: fields 'chosen' and 'rejected' are identical"),
    ({"prompt": "What is 1+1?", "chosen": "1+1=2", "rejected": " "}, ":1: field 'rejected' is an empty completion"),
])
def test_rm_bad_pairs(rec, expected, sft_run, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(SystemExit, match="^error: " + str(path) + expected):
        rm.main(rm.parse_args(["--model", str(sft_run), "--data", str(path), "--output_dir", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_exit_status_and_stderr_from_the_command_line(base, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n")
    p = run("sft", "--data", path, "--output_dir", tmp_path / "out", check=False)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {path}:1: malformed JSON")
    assert not (tmp_path / "out").exists()
