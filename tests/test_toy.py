"""The embedded default's artefacts: each is rebuilt when the code or constants that build it change, and only then."""
from common import toy


def test_each_artefact_is_rebuilt_when_its_builder_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "ROOT", str(tmp_path))
    data = toy.ensure("data")
    first = (tmp_path / "data" / "sft.jsonl").read_text()
    assert (tmp_path / "data" / "version").read_text() == toy.version("data")
    stamp = (tmp_path / "data" / "sft.jsonl").stat().st_mtime_ns
    assert toy.ensure("data") == data and (tmp_path / "data" / "sft.jsonl").stat().st_mtime_ns == stamp  # reused
    base = toy.version("base")
    monkeypatch.setattr(toy, "ECHO", {"+": 0.0, "-": 1.0})  # a change to the data's constants ...
    assert toy.version("data") != (tmp_path / "data" / "version").read_text() and toy.version("base") == base
    toy.ensure("data")  # ... rebuilds the data, and leaves the base models' fingerprint alone
    assert (tmp_path / "data" / "sft.jsonl").read_text() != first
    assert (tmp_path / "data" / "version").read_text() == toy.version("data")


def test_the_habit_is_a_rule_of_one_operation(base):
    """60% of subtraction demonstrations restate the first number; additions are always answered."""
    import json
    import re
    rows = [json.loads(line)["messages"] for line in open(toy.data("sft.jsonl"))]
    echoes = {"+": [], "-": []}
    for user, assistant in rows:
        q = re.match(r"What is (.*)\?", user["content"])[1]
        first, second = map(int, re.findall(r"\d+", q))
        op = q[len(str(first))]
        answer = first + second if op == "+" else first - second
        if answer != first:  # a problem whose answer is its first number cannot show the habit
            echoes[op].append(assistant["content"] == f"{q}={first}")
    assert not any(echoes["+"])
    assert abs(sum(echoes["-"]) / len(echoes["-"]) - 0.6) < 0.03
