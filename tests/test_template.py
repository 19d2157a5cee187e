"""Assistant-only masking through the tokenizer's own chat template."""
import copy

import pytest
import torch
from util import chat

from common.packing import pad
from common.template import IGNORE, encode_chat, encode_prompt, encode_response


def labelled(tok, ids, labels):
    return tok.decode([t for t, l in zip(ids, labels) if l != IGNORE])


def test_multi_turn_only_assistant_turns_and_their_end_token(tok):
    msgs = chat("sys:Be brief.", "What is 1+2?", "1+2=3", "And 5+5?", "5+5=10")
    ids, labels = encode_chat(tok, msgs)
    assert len(ids) == len(labels)
    assert labelled(tok, ids, labels) == "1+2=3<|im_end|>5+5=10<|im_end|>"
    # every labelled position holds its own token; nothing of system or user turns is labelled
    assert all(l == t for t, l in zip(ids, labels) if l != IGNORE)
    unlabelled = tok.decode([t for t, l in zip(ids, labels) if l == IGNORE])
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert unlabelled == rendered.replace("1+2=3<|im_end|>", "").replace("5+5=10<|im_end|>", "")


def test_first_answer_token_is_labelled(tok):
    ids, labels = encode_chat(tok, chat("What is 7+1?", "7+1=8"))
    header = encode_prompt(tok, chat("What is 7+1?"))
    assert ids[:len(header)] == header
    assert labels[len(header) - 1] == IGNORE  # the "\n" ending the assistant header
    assert labels[len(header)] == ids[len(header)] == tok.convert_tokens_to_ids("7")


def test_response_labels_skip_earlier_assistant_turns_of_the_prompt(tok):
    prompt = chat("What is 1+1?", "1+1=2", "And 2+2?")
    ids, labels = encode_response(tok, prompt, [{"role": "assistant", "content": "2+2=4"}])
    assert labelled(tok, ids, labels) == "2+2=4<|im_end|>"


def test_no_doubled_bos(tok):
    """A tokenizer that adds BOS by itself and a template that writes it: one BOS in the ids."""
    from tokenizers import processors
    t = copy.deepcopy(tok)
    t.bos_token = "<|endoftext|>"
    t._tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                special_tokens=[("<|endoftext|>", 0)])
    t.chat_template = "{{ bos_token }}" + tok.chat_template
    msgs = chat("What is 1+1?", "1+1=2")
    naive = t(t.apply_chat_template(msgs, tokenize=False))["input_ids"]
    assert naive[:2] == [0, 0]  # the double BOS this guards against
    ids, labels = encode_chat(t, msgs)
    assert ids.count(0) == 1 and ids[0] == 0
    assert labelled(t, ids, labels) == "1+1=2<|im_end|>"


def test_padding_never_carries_loss(tok):
    docs = [encode_chat(tok, chat("What is 1+1?", "1+1=2")),
            encode_chat(tok, chat("sys:x", "What is 10+10?", "10+10=20"))]
    b = pad(docs, tok.pad_token_id)
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()
    assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()


def test_template_that_is_not_prefix_stable_is_refused(tok):
    t = copy.deepcopy(tok)
    # renders the final message differently from the same message followed by others
    t.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
                       "{% if loop.last %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}")
    with pytest.raises(SystemExit, match="not prefix-stable"):
        encode_chat(t, chat("What is 1+1?", "1+1=2", "And 2+2?", "2+2=4"))


def test_tokenizer_without_template_is_refused(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    with pytest.raises(SystemExit, match="no chat template"):
        encode_chat(t, chat("What is 1+1?", "1+1=2"))


def test_fully_masked_micro_batch_contributes_zero_not_nan(tok):
    from algos.sft import sft_loss
    from common.logps import token_logps

    def loss_of(logits_BTV, labels_BT, n):  # as sft.py: the labelled positions' log-probs, then sft_loss
        mask = labels_BT[:, 1:] != IGNORE
        return sft_loss(token_logps(logits_BTV[:, :-1][mask], labels_BT[:, 1:][mask]), n)
    logits = torch.randn(2, 5, len(tok), requires_grad=True)
    labels = torch.full((2, 5), IGNORE)
    loss = loss_of(logits, labels, n=0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and (logits.grad == 0).all()
    # and beside a micro-batch with labels, the step's loss is that micro-batch's alone
    labels2 = torch.tensor([[IGNORE, 3, 4, IGNORE, IGNORE], [IGNORE] * 5])
    n = 2
    both = loss_of(logits, labels2, n) + loss_of(logits, labels, n)
    assert torch.allclose(both, loss_of(logits[:1], labels2[:1], n))
