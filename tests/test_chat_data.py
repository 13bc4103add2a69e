"""Chat data through the model's own chat template. Reference: transformers' `apply_chat_template`
(its tokens, and its assistant mask where the template has `{% generation %}` markers), a
prefix-diff mask computed here from transformers' renderings, and the trained text written out by
hand. Tokenizers with chat templates are built here (no network): a byte-level BPE trained on a
few sentences, saved with a tokenizer_config.json or a chat_template.jinja."""

import json

import numpy as np
import pytest

from horizon import HorizonError
from horizon.data import DataConfig, load_tokenizer, load_training_data, token_file

transformers = pytest.importorskip("transformers")

# ChatML with tools and tool calls; the assistant's reply and its end-of-turn are the generation.
CHATML_GEN = (
    "{%- set ns = namespace(skip=false) -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0].role == 'system' -%}{{- messages[0].content + '\\n\\n' -}}{%- set ns.skip = true -%}{%- endif -%}"
    "{{- '# Tools\\n' -}}{%- for t in tools -%}{{- t | tojson -}}{{- '\\n' -}}{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if loop.first and ns.skip -%}"
    "{%- elif m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{%- if m.content -%}{{- m.content -}}{%- endif -%}"
    "{%- for c in m.tool_calls or [] -%}{{- '<tool_call>' + (c.function | tojson) + '</tool_call>' -}}{%- endfor -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# The same layout without generation markers: Horizon diffs prefixes.
CHATML_PLAIN = CHATML_GEN.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
# Llama-3 style headers, BOS from the template, tool results as the `ipython` role.
LLAMA3 = (
    "{{- bos_token -}}"
    "{%- if tools -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nYou may call these functions:\\n' -}}"
    "{%- for t in tools -%}{{- t | tojson -}}{{- '\\n' -}}{%- endfor -%}{{- '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'tool' -%}{%- set role = 'ipython' -%}{%- else -%}{%- set role = m.role -%}{%- endif -%}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' -}}"
    "{%- if m.tool_calls -%}"
    "{%- for c in m.tool_calls -%}"
    "{{- '{\"name\": \"' + c.function.name + '\", \"parameters\": ' + (c.function.arguments | tojson) + '}' -}}"
    "{%- endfor -%}"
    "{%- else -%}{{- m.content | trim -}}{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
# Rewrites history: earlier assistant turns lose their reasoning, the last keeps it.
REWRITES_HISTORY = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' and not loop.last -%}"
    "{{- '<|im_start|>assistant\\n' + m.content.split('</think>')[-1] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CORPUS = [
    "What is two plus two? Four. Name a colour. Blue. Another? Green. Be brief.",
    "the weather in Paris is sunny and warm today; call get_weather with the city",
    "You are a helpful assistant. Tools: functions, parameters, name, arguments, result.",
    "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}} <think>hmm</think>",
]

CONVERSATIONS = [
    # system prompt, one turn
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"},
     {"role": "assistant", "content": "Four."}],
    # multi-turn
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}],
    # system prompt, multi-turn
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Green."}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "the weather in Paris?"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                          "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny and warm"},
    {"role": "assistant", "content": "It is sunny and warm today."},
]


def build_tokenizer_json(path, bos_post_processor=False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    if bos_post_processor:
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(path))


def make_model_dir(d, template=None, *, style="chatml", template_file=False, extra=None):
    """A tokenizer directory like a model's: tokenizer.json + tokenizer_config.json (+ the template
    in tokenizer_config.json, or in chat_template.jinja with `template_file`)."""
    d.mkdir(parents=True, exist_ok=True)
    build_tokenizer_json(d / "tokenizer.json", bos_post_processor=style == "llama3")
    if style == "llama3":
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
               "eos_token": "<|eot_id|>", "pad_token": "<|endoftext|>"}
    else:
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    cfg.update(extra or {})
    if template is not None and not template_file:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    if template is not None and template_file:
        (d / "chat_template.jinja").write_text(template)
    return d


def hf_tokenizer(d):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def documents(tf):
    """[(ids, mask)] per document of a TokenFile."""
    out = []
    for a, b in zip(tf.docs[:-1].tolist(), tf.docs[1:].tolist()):
        ids = np.asarray(tf.ids[a:b]).tolist()
        mask = [1] * (b - a) if tf.mask is None else np.asarray(tf.mask[a:b]).tolist()
        out.append((ids, mask))
    return out


def trained_text(hf, ids, mask):
    """The trained runs, each decoded."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(hf.decode(cur))
            cur = []
    if cur:
        runs.append(hf.decode(cur))
    return runs


def prefix_diff_reference(hf, messages, tools=None):
    """The assistant mask by rendering prefixes: assistant message i spans from the end of
    messages[:i] with the generation prompt to the end of messages[:i+1]; a token overlapping a
    span is trained."""
    full = hf.apply_chat_template(messages, tools=tools, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = hf.apply_chat_template(messages[:i], tools=tools, tokenize=False, add_generation_prompt=True)
        upto = hf.apply_chat_template(messages[: i + 1], tools=tools, tokenize=False)
        assert full.startswith(before) and full.startswith(upto)
        spans.append((len(before), len(upto)))
    enc = hf(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(e > s and b < t for s, t in spans)) for b, e in enc["offset_mapping"]]
    return enc["input_ids"], mask


# --------------------------------------------------------------------------- generation markers
def test_generation_markers_give_transformers_tokens_and_assistant_mask(tmp_path):
    d = make_model_dir(tmp_path / "model", CHATML_GEN)
    hf = hf_tokenizer(d)
    tok = load_tokenizer(d)
    assert tok.has_chat_template
    records = [{"messages": c} for c in CONVERSATIONS] + [{"messages": TOOL_CONVERSATION, "tools": TOOLS}]
    tf = token_file(write_jsonl(tmp_path / "chat.jsonl", records), tok)
    got = documents(tf)
    assert len(got) == len(records)
    for (ids, mask), r in zip(got, records):
        ref = hf.apply_chat_template(r["messages"], tools=r.get("tools"), return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert ids == list(ref["input_ids"])
        assert mask == list(ref["assistant_masks"])
    # Written out by hand: what the model learns to say, and nothing else.
    assert trained_text(hf, *got[0]) == ["Four.<|im_end|>"]
    assert trained_text(hf, *got[1]) == ["Blue.<|im_end|>", "Green.<|im_end|>"]
    assert trained_text(hf, *got[2]) == ["Blue.<|im_end|>", "Green.<|im_end|>"]
    assert trained_text(hf, *got[3]) == [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>',
        "It is sunny and warm today.<|im_end|>",
    ]
    # The system prompt, the tools and the tool's result are context.
    context = hf.decode([i for i, m in zip(*got[3]) if not m])
    assert "Be brief." in context and "get_weather" in context and "sunny and warm<|im_end|>" in context


def test_template_in_chat_template_jinja_file(tmp_path):
    d = make_model_dir(tmp_path / "model", CHATML_GEN, template_file=True)
    tok = load_tokenizer(d / "tokenizer.json")
    assert tok.has_chat_template
    tf = token_file(write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[0]}]), tok)
    ref = hf_tokenizer(d).apply_chat_template(CONVERSATIONS[0], return_dict=True, return_assistant_tokens_mask=True)
    assert documents(tf) == [(list(ref["input_ids"]), list(ref["assistant_masks"]))]


# --------------------------------------------------------------------------- prefix diff
def test_without_markers_the_prefix_diff_trains_the_assistant_turns(tmp_path):
    plain = make_model_dir(tmp_path / "plain", CHATML_PLAIN)
    marked = make_model_dir(tmp_path / "marked", CHATML_GEN)
    hf_plain, hf_marked = hf_tokenizer(plain), hf_tokenizer(marked)
    records = [{"messages": c} for c in CONVERSATIONS] + [{"messages": TOOL_CONVERSATION, "tools": TOOLS}]
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    got = documents(token_file(data, load_tokenizer(plain), fallback_dir=tmp_path / "c1"))
    for (ids, mask), r in zip(got, records):
        ref_ids, ref_mask = prefix_diff_reference(hf_plain, r["messages"], r.get("tools"))
        assert ids == ref_ids == hf_plain.apply_chat_template(r["messages"], tools=r.get("tools"))["input_ids"]
        assert mask == ref_mask
        # Against transformers' own mask for the same layout with markers: the same tokens, and
        # the diff adds only the newline the template writes after each assistant turn.
        m = hf_marked.apply_chat_template(r["messages"], tools=r.get("tools"), return_dict=True,
                                          return_assistant_tokens_mask=True)
        assert list(m["input_ids"]) == ids
        extra = [i for i, (a, b) in enumerate(zip(mask, m["assistant_masks"])) if a != b]
        assert all(mask[i] == 1 and m["assistant_masks"][i] == 0 for i in extra)
        assert hf_plain.decode([ids[i] for i in extra]) == "\n" * len(extra)
        assert len(extra) == sum(1 for x in r["messages"] if x["role"] == "assistant")
    assert trained_text(hf_plain, *got[1]) == ["Blue.<|im_end|>\n", "Green.<|im_end|>\n"]


def test_llama3_style_headers(tmp_path):
    d = make_model_dir(tmp_path / "llama", LLAMA3, style="llama3")
    hf = hf_tokenizer(d)
    records = [{"messages": c} for c in CONVERSATIONS] + [{"messages": TOOL_CONVERSATION, "tools": TOOLS}]
    got = documents(token_file(write_jsonl(tmp_path / "chat.jsonl", records), load_tokenizer(d)))
    for (ids, mask), r in zip(got, records):
        ref_ids, ref_mask = prefix_diff_reference(hf, r["messages"], r.get("tools"))
        assert ids == ref_ids
        assert mask == ref_mask
        assert ids[0] == hf.convert_tokens_to_ids("<|begin_of_text|>")  # the template's BOS, once
        assert ids.count(ids[0]) == 1
    assert trained_text(hf, *got[0]) == ["Four.<|eot_id|>"]
    assert trained_text(hf, *got[2]) == ["Blue.<|eot_id|>", "Green.<|eot_id|>"]
    assert trained_text(hf, *got[3]) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is sunny and warm today.<|eot_id|>"]


def test_text_documents_get_the_tokenizers_bos_and_an_eos(tmp_path):
    d = make_model_dir(tmp_path / "llama", LLAMA3, style="llama3")
    hf = hf_tokenizer(d)
    tok = load_tokenizer(d)
    tf = token_file(write_jsonl(tmp_path / "t.jsonl", [{"text": "the weather in Paris"}]), tok)
    (ids, mask), = documents(tf)
    assert ids == hf("the weather in Paris")["input_ids"] + [tok.eos_id]
    assert ids[0] == hf.bos_token_id and tf.mask is None


def test_conversational_prompt_completion_trains_only_the_completion(tmp_path):
    for name, template in (("marked", CHATML_GEN), ("plain", CHATML_PLAIN)):
        d = make_model_dir(tmp_path / name, template)
        hf = hf_tokenizer(d)
        conv = CONVERSATIONS[1]
        rec = {"prompt": conv[:3], "completion": conv[3:]}
        (ids, mask), = documents(token_file(write_jsonl(tmp_path / f"{name}.jsonl", [rec]), load_tokenizer(d)))
        assert ids == hf.apply_chat_template(conv)["input_ids"]
        want = ["Green.<|im_end|>"] if name == "marked" else ["Green.<|im_end|>\n"]
        assert trained_text(hf, ids, mask) == want


# --------------------------------------------------------------------------- refusals
def test_a_template_that_rewrites_history_is_refused_per_conversation(tmp_path):
    d = make_model_dir(tmp_path / "m", REWRITES_HISTORY)
    tok = load_tokenizer(d)
    convs = [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Four."}],  # one turn: fine
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>hmm</think>Blue."},
         {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}],
    ]
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in convs])
    with pytest.raises(HorizonError) as e:
        token_file(data, tok)
    msg = str(e.value)
    assert "\n" not in msg and f"{data}:2:" in msg and "field 'messages'" in msg and "cannot be separated" in msg
    tf = token_file(data, tok, skip_bad_records=True)
    assert tf.n_docs == 1 and tf.bad_records == 1 and tf.n_records == 2
    assert "cannot be separated" in tf.bad_examples[0]
    hf = hf_tokenizer(d)
    assert trained_text(hf, *documents(tf)[0]) == ["Four.<|im_end|>\n"]


def test_markers_that_cover_nothing_and_assistant_first_are_refused(tmp_path):
    empty_marks = CHATML_PLAIN.replace("{{- '<|im_end|>' -}}{{- '\\n' -}}", "{{- '<|im_end|>' -}}{%- generation -%}{%- endgeneration -%}{{- '\\n' -}}")
    assert empty_marks != CHATML_PLAIN
    d = make_model_dir(tmp_path / "m", empty_marks)
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(HorizonError, match="cover none of the assistant's tokens"):
        token_file(data, load_tokenizer(d))
    d2 = make_model_dir(tmp_path / "p", CHATML_PLAIN)
    data2 = write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "assistant", "content": "Hi."}]}])
    with pytest.raises(HorizonError, match=r"a\.jsonl:1: field 'messages': message 0 is the assistant's"):
        token_file(data2, load_tokenizer(d2))


def test_chat_data_needs_a_template_except_with_the_shipped_tokenizer(tmp_path):
    d = make_model_dir(tmp_path / "base", None)
    tok = load_tokenizer(d)
    assert not tok.has_chat_template
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "plain is fine"}, {"messages": CONVERSATIONS[0]}])
    with pytest.raises(HorizonError) as e:
        token_file(data, tok)
    assert "c.jsonl:2: chat data needs a chat template" in str(e.value) and "--chat-template" in str(e.value)
    # --chat-template supplies one: rendered as transformers renders with that template.
    tfile = tmp_path / "tmpl.jinja"
    tfile.write_text(CHATML_GEN)
    tok2 = load_tokenizer(d, chat_template_file=tfile)
    got = documents(token_file(data, tok2, fallback_dir=tmp_path / "cache"))
    ref = hf_tokenizer(d).apply_chat_template(CONVERSATIONS[0], chat_template=CHATML_GEN, return_dict=True,
                                              return_assistant_tokens_mask=True)
    assert got[1] == (list(ref["input_ids"]), list(ref["assistant_masks"]))
    with pytest.raises(HorizonError, match="--chat-template file .* does not exist"):
        load_tokenizer(d, chat_template_file=tmp_path / "nope.jinja")


def test_shipped_tokenizer_keeps_its_layout_and_refuses_tool_calls(tmp_path):
    from horizon.data import TextTokenizer, shipped_tokenizer_path

    tok = TextTokenizer(shipped_tokenizer_path())
    assert tok.is_shipped and not tok.has_chat_template
    data = write_jsonl(tmp_path / "t.jsonl", [{"messages": CONVERSATIONS[0]}, {"messages": TOOL_CONVERSATION}])
    with pytest.raises(HorizonError) as e:
        token_file(data, tok)
    assert f"{data}:2: field 'messages': message 2 has tool calls" in str(e.value)


def test_template_errors_name_the_record(tmp_path):
    strict = "{%- for m in messages -%}{%- if m.role == 'user' and loop.index0 % 2 == 1 -%}{{ raise_exception('roles must alternate user/assistant') }}{%- endif -%}{{- m.role + ': ' + m.content + '\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}"
    d = make_model_dir(tmp_path / "m", strict)
    data = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"},
                      {"role": "assistant", "content": "z"}]},
    ])
    with pytest.raises(HorizonError) as e:
        token_file(data, load_tokenizer(d))
    assert f"{data}:2: field 'messages': the chat template failed on it: roles must alternate" in str(e.value)


def test_chat_run_batches_carry_the_template_tokens(tmp_path):
    d = make_model_dir(tmp_path / "model", CHATML_GEN)
    hf = hf_tokenizer(d)
    tok = load_tokenizer(d)
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in CONVERSATIONS])
    td = load_training_data(DataConfig(data=[str(data)]), tok, seq_len=128, seed=0)
    seen = []
    for k in range(td.train.n_sequences):
        ids, labels, pos = td.train.batch(k, 1)
        ids, labels, pos = ids[0].tolist(), labels[0].tolist(), pos[0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0]
        for a, b in zip(starts, starts[1:] + [len(pos)]):
            seen.append((ids[a:b], labels[a:b]))
    for c in CONVERSATIONS:
        ref = hf.apply_chat_template(c, return_dict=True, return_assistant_tokens_mask=True)
        want_ids = list(ref["input_ids"])
        want_labels = [-100] + [t if m else -100 for t, m in zip(want_ids[1:], ref["assistant_masks"][1:])]
        assert (want_ids, want_labels) in seen


# --------------------------------------------------------------------------- tokenizer files for export
@pytest.mark.parametrize("with_generation_config", [True, False])
def test_tokenizer_files_travel_byte_identical_to_the_export(tmp_path, with_generation_config):
    from transformers import AutoTokenizer, GenerationConfig

    from horizon.io.tokenizer_files import copy_tokenizer_files, export_tokenizer_files

    src = make_model_dir(tmp_path / "src", LLAMA3, style="llama3", template_file=True)
    (src / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool_use.jinja").write_text(CHATML_GEN)
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))  # not a tokenizer file
    if with_generation_config:
        (src / "generation_config.json").write_text('{"bos_token_id": 3, "eos_token_id": [6, 0], "temperature": 0.6}\n')
    model_config = {"bos_token_id": 3, "eos_token_id": 6, "pad_token_id": None, "max_position_embeddings": 64}

    run, export = tmp_path / "run", tmp_path / "export"
    run.mkdir()
    (run / "chat_template.jinja").write_text("stale")  # a leftover is replaced
    copied = copy_tokenizer_files(src / "tokenizer.json", run)  # the run's --tokenizer, or the model dir
    assert copied == copy_tokenizer_files(src, run)
    assert ("generation_config.json" in copied) == with_generation_config
    written = export_tokenizer_files(run, export, model_config)
    expected = ["additional_chat_templates/tool_use.jinja", "chat_template.jinja", "special_tokens_map.json",
                "tokenizer.json", "tokenizer_config.json"]
    assert written == sorted(expected + ["generation_config.json"])
    for name in expected:
        assert (export / name).read_bytes() == (src / name).read_bytes(), name
        assert (run / name).read_bytes() == (src / name).read_bytes(), name
    assert not (export / "config.json").exists()

    a, b = AutoTokenizer.from_pretrained(str(src)), AutoTokenizer.from_pretrained(str(export))
    for conv in CONVERSATIONS:
        assert a.apply_chat_template(conv, tokenize=False) == b.apply_chat_template(conv, tokenize=False)
        assert a.apply_chat_template(conv)["input_ids"] == b.apply_chat_template(conv)["input_ids"]
    assert a.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS) == b.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS)

    gen = export / "generation_config.json"
    if with_generation_config:
        assert gen.read_bytes() == (src / "generation_config.json").read_bytes()
        assert GenerationConfig.from_pretrained(str(export)).temperature == 0.6
    else:
        g = GenerationConfig.from_pretrained(str(export))
        assert (g.bos_token_id, g.eos_token_id, g.pad_token_id) == (3, 6, None)
        ref = GenerationConfig.from_model_config(transformers.PretrainedConfig(**model_config))
        assert (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (3, 6, None)


def test_shipped_tokenizer_export_gets_a_minimal_tokenizer_config(tmp_path):
    from transformers import AutoTokenizer

    from horizon.data import shipped_tokenizer_path
    from horizon.io.tokenizer_files import copy_tokenizer_files, export_tokenizer_files

    run, export = tmp_path / "run", tmp_path / "export"
    assert copy_tokenizer_files(shipped_tokenizer_path(), run) == ["tokenizer.json"]
    written = export_tokenizer_files(run, export, {"eos_token_id": 0, "max_position_embeddings": 128})
    assert written == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert (export / "tokenizer.json").read_bytes() == shipped_tokenizer_path().read_bytes()
    t = AutoTokenizer.from_pretrained(str(export))
    assert t.eos_token == "<|endoftext|>"
    assert json.loads((export / "generation_config.json").read_text()) == {"_from_model_config": True, "eos_token_id": 0}


def test_a_lone_tokenizer_file_with_chat_template_option(tmp_path):
    # --tokenizer FILE not named tokenizer.json: the plain fast tokenizer of that file, with the
    # --chat-template template (the directory's other files are not its own).
    from transformers import PreTrainedTokenizerFast

    d = make_model_dir(tmp_path / "m", CHATML_PLAIN)
    lone = tmp_path / "custom.json"
    lone.write_bytes((d / "tokenizer.json").read_bytes())
    tfile = tmp_path / "t.jinja"
    tfile.write_text(CHATML_GEN)
    assert not load_tokenizer(lone).has_chat_template
    tok = load_tokenizer(lone, chat_template_file=tfile)
    got = documents(token_file(write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[2]}]), tok))
    ref = PreTrainedTokenizerFast(tokenizer_file=str(lone)).apply_chat_template(
        CONVERSATIONS[2], chat_template=CHATML_GEN, return_dict=True, return_assistant_tokens_mask=True)
    assert got == [(list(ref["input_ids"]), list(ref["assistant_masks"]))]


def test_a_chat_template_option_travels_as_chat_template_jinja(tmp_path):
    from transformers import AutoTokenizer

    from horizon.io.tokenizer_files import copy_tokenizer_files, export_tokenizer_files

    src = make_model_dir(tmp_path / "src", CHATML_PLAIN)
    run, export = tmp_path / "run", tmp_path / "export"
    written = copy_tokenizer_files(src, run, chat_template=LLAMA3)
    assert written == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert (run / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    export_tokenizer_files(run, export, {"eos_token_id": 2})
    rendered = AutoTokenizer.from_pretrained(str(export)).apply_chat_template(CONVERSATIONS[0], tokenize=False)
    want = hf_tokenizer(src).apply_chat_template(CONVERSATIONS[0], chat_template=LLAMA3, tokenize=False)
    assert rendered == want
    # resuming from the run directory renders with the option's template too
    assert load_tokenizer(run).hf.apply_chat_template(CONVERSATIONS[0], tokenize=False) == want
