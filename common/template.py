"""Chat rendering through the tokenizer's own chat template: token ids and assistant-only labels.

Real templates (Llama-3, Qwen, Mistral) mark no assistant spans, so each span is found by
rendering prefixes: assistant turn i covers the characters between
render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]), trailing whitespace
dropped, so its content and its end-of-turn token carry labels and nothing else does. The text is
rendered once and tokenized once with add_special_tokens=False (the template already holds any
BOS), and each token is labelled by where its characters start.
"""
from common.data import fail

IGNORE = -100  # label of positions that carry no loss


def render(tok, msgs, gen=False):
    if not getattr(tok, "chat_template", None):
        fail(f"tokenizer {tok.name_or_path!r} has no chat template (set tokenizer.chat_template)")
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def encode_chat(tok, msgs, first=0):
    """messages -> (ids, labels), labels = ids on assistant turns from message `first` on, IGNORE elsewhere."""
    if not tok.is_fast:
        fail(f"tokenizer {tok.name_or_path!r} is not a fast tokenizer (character offsets are needed)")
    text = render(tok, msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or i < first:
            continue
        head, upto = render(tok, msgs[:i], gen=True) if i else "", render(tok, msgs[: i + 1])
        if not (text.startswith(upto) and upto.startswith(head)):
            fail(f"chat template of {tok.name_or_path!r} is not prefix-stable at message {i}: "
                 "rendering a prefix of the conversation does not give a prefix of the whole")
        spans.append((len(head), len(head) + len(upto[len(head):].rstrip())))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if any(a <= s < b for a, b in spans) else IGNORE for t, (s, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def encode_prompt(tok, msgs):
    """Prompt messages -> ids ending with the assistant header, ready for generation."""
    return tok(render(tok, msgs, gen=True), add_special_tokens=False)["input_ids"]


def encode_response(tok, prompt, response):
    """(prompt messages, response messages) -> (ids, labels), labels only on the response."""
    return encode_chat(tok, prompt + response, first=len(prompt))


def step_ends(tok, comp_ids):
    """Positions in a completion's tokens where a step (a line) ends: each token that brings a new line break, and
    the last token (the end-of-turn token, or where the length limit cut the completion). Found by decoding the
    growing prefix, so a token that merges a line break with other characters counts too."""
    ends, breaks = [], 0
    for t in range(len(comp_ids)):
        n = tok.decode(comp_ids[:t + 1], skip_special_tokens=True).count("\n")
        if n > breaks and t < len(comp_ids) - 1:
            ends.append(t)
        breaks = n
    return ends + [len(comp_ids) - 1]
