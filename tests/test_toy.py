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


def test_a_chain_is_steps_of_the_one_step_task():
    """Each step starts from the last one's result; operands and results stay in 0..99; the answer is the last."""
    import random
    import re
    rng = random.Random(0)
    for _ in range(500):
        q, steps = toy.chain(rng)
        assert len(steps) in toy.CHAIN_OPS
        assert q == steps[0][0] + "".join(re.match(r"\d+(.*)", s)[1] for s, _ in steps[1:])
        for i, (step, result) in enumerate(steps):
            a, op, b = re.match(r"(\d+)([+-])(\d+)$", step).groups()
            assert i == 0 or a == steps[i - 1][1]
            assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert all(0 <= int(n) <= 99 for n in (a, b, result))


def test_chain_files(base):
    import json
    sft = [json.loads(line)["messages"] for line in open(toy.data("chain_sft.jsonl"))]
    ev = [json.loads(line) for line in open(toy.data("chain_eval.jsonl"))]
    rl = [json.loads(line) for line in open(toy.data("chain_rl.jsonl"))]
    assert len(ev) == toy.N_EVAL and len(sft) == 12000 and len(rl) > 5000
    held_out = {r["prompt"] for r in ev}
    assert not held_out & {m[0]["content"] for m in sft} and not held_out & {r["prompt"] for r in rl}
    assert all(toy.verify("\n".join(r["steps"]), r["answer"]) == 1.0 for r in ev)
    # every demonstration is the correct solution: each line's arithmetic, and the problem's answer at the end
    for m in sft:
        lines = m[1]["content"].split("\n")
        assert all(int(y) == eval(lhs) for lhs, y in (line.split("=") for line in lines))
        assert lines[-1].split("=")[1] == str(eval(m[0]["content"][8:-1]))
