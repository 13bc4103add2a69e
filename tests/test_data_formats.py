"""Fine-tuning data as users have it: each record layout (OpenAI messages, ShareGPT, Alpaca,
prompt/completion, text) and each container (JSON lines, JSON array, Parquet, a `datasets`
directory from save_to_disk) reads into the same tokens as its JSON-lines twin; bad records give
one line each naming file, record and field; the data options validate with one line naming the
flag. Reference for the chat tokens: transformers' apply_chat_template on the equivalent messages."""

import dataclasses
import json
import sys

import numpy as np
import pytest

from horizon import HorizonError
from horizon.data import DataConfig, load_tokenizer, load_training_data, token_file

pytest.importorskip("transformers")
from test_chat_data import CHATML_GEN, TOOLS, documents, hf_tokenizer, make_model_dir, write_jsonl  # noqa: E402

SYSTEM = "Be brief."
RECORDS = [
    {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is two plus two?"},
                  {"role": "assistant", "content": "Four."}]},
    {"messages": [{"role": "user", "content": "the weather in Paris?"},
                  {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                      "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": "sunny"},
                  {"role": "assistant", "content": "Sunny."}], "tools": TOOLS},
    {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."},
                       {"from": "human", "value": "Another?"}, {"from": "gpt", "value": "Green."}],
     "system": SYSTEM},
    {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"prompt": "The weather in Paris is", "completion": " sunny."},
    {"text": "the cat sat on the mat"},
]
# What each record means, as messages (chats) or as (prompt, completion) / text.
EQUIVALENT = [
    RECORDS[0]["messages"],
    RECORDS[1]["messages"],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Green."}],
    [{"role": "user", "content": "Add the numbers.\n2 and 2"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = make_model_dir(tmp_path_factory.mktemp("m") / "model", CHATML_GEN)
    return d, load_tokenizer(d), hf_tokenizer(d)


def _tokens(path, tok, **kw):
    tf = token_file(path, tok, fallback_dir=path.parent / "cache", **kw)
    return tf, documents(tf)


def test_each_record_layout_means_what_it_says(tmp_path, model):
    d, tok, hf = model
    _, got = _tokens(write_jsonl(tmp_path / "all.jsonl", RECORDS), tok)
    assert len(got) == len(RECORDS)
    for (ids, mask), msgs, rec in zip(got, EQUIVALENT, RECORDS):
        ref = hf.apply_chat_template(msgs, tools=rec.get("tools"), return_dict=True, return_assistant_tokens_mask=True)
        assert (ids, mask) == (list(ref["input_ids"]), list(ref["assistant_masks"]))
    # prompt/completion: the prompt is context, the completion and end-of-text are trained
    ids, mask = got[5]
    p = hf("The weather in Paris is", add_special_tokens=False)["input_ids"]
    c = hf(" sunny.", add_special_tokens=False)["input_ids"]
    assert ids == p + c + [tok.eos_id] and mask == [0] * len(p) + [1] * (len(c) + 1)
    ids, mask = got[6]
    assert ids == hf("the cat sat on the mat", add_special_tokens=False)["input_ids"] + [tok.eos_id]
    assert mask == [1] * len(ids)


def _twins(tmp_path, records):
    """The same records as JSON lines, a JSON array, Parquet and a save_to_disk directory."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    datasets = pytest.importorskip("datasets")
    out = {"jsonl": write_jsonl(tmp_path / "d.jsonl", records)}
    (tmp_path / "d.json").write_text(json.dumps(records, indent=2))
    out["json"] = tmp_path / "d.json"
    # Columns over all records (from_pylist / from_list take the first record's keys only).
    keys = list(dict.fromkeys(k for r in records for k in r))
    columns = {k: [r.get(k) for r in records] for k in keys}
    pq.write_table(pa.Table.from_pydict(columns), tmp_path / "d.parquet")
    out["parquet"] = tmp_path / "d.parquet"
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "d_hf"))
    out["hf"] = tmp_path / "d_hf"
    return out


def test_every_container_reads_into_the_same_tokens_as_its_jsonl_twin(tmp_path, model):
    _, tok, _ = model
    twins = _twins(tmp_path, RECORDS)
    ref_tf, ref = _tokens(twins["jsonl"], tok)
    assert len(ref) == len(RECORDS)
    for kind in ("json", "parquet", "hf"):
        tf, got = _tokens(twins[kind], tok)
        assert got == ref, kind
        assert tf.n_records == len(RECORDS) and tf.bad_records == 0
        assert (np.asarray(tf.docs) == np.asarray(ref_tf.docs)).all()


def test_each_layout_alone_in_each_container(tmp_path, model):
    # One layout per file, as data sets usually come (Parquet columns then hold one layout only).
    _, tok, _ = model
    groups = {"messages": RECORDS[0:2], "sharegpt": RECORDS[2:3], "alpaca": RECORDS[3:5],
              "prompt_completion": RECORDS[5:6], "text": RECORDS[6:7]}
    for name, recs in groups.items():
        sub = tmp_path / name
        sub.mkdir()
        twins = _twins(sub, recs)
        _, ref = _tokens(twins["jsonl"], tok)
        for kind in ("json", "parquet", "hf"):
            assert _tokens(twins[kind], tok)[1] == ref, (name, kind)


def test_arrow_nulls_from_other_records_do_not_reach_the_template(tmp_path, model):
    # Arrow gives each record the union of all records' nested fields: tool schemas and tool-call
    # arguments of other records come back as nulls, which must not render.
    _, tok, _ = model
    other_tool = {"type": "function", "function": {"name": "add", "description": "adds numbers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
    recs = [RECORDS[1], {
        "messages": [{"role": "user", "content": "2 and 2?"},
                     {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                         "name": "add", "arguments": {"a": 2, "b": 2}}}]},
                     {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}],
        "tools": [other_tool]}]
    twins = _twins(tmp_path, recs)
    _, ref = _tokens(twins["jsonl"], tok)
    for kind in ("parquet", "hf"):
        assert _tokens(twins[kind], tok)[1] == ref, kind


def test_a_byte_order_mark_is_not_data(tmp_path, model):
    _, tok, _ = model
    twins = _twins(tmp_path, RECORDS[5:7])
    _, ref = _tokens(twins["jsonl"], tok)
    for name in ("jsonl", "json"):
        f = tmp_path / f"bom.{name}"
        f.write_bytes(b"\xef\xbb\xbf" + twins[name].read_bytes())
        assert _tokens(f, tok)[1] == ref, name


def test_field_map_reads_other_names(tmp_path, model):
    _, tok, _ = model
    renamed = [
        {"dialog": [{"speaker": m["role"], "text": m["content"]} for m in RECORDS[0]["messages"]]},
        {"question": "Add the numbers.", "context": "2 and 2", "answer": "4"},
        {"body": "the cat sat on the mat"},
    ]
    cfg = DataConfig(field_map="messages=dialog,role=speaker,content=text,instruction=question,input=context,"
                               "output=answer")
    cfg_text = DataConfig(field_map={"text": "body"})
    f = write_jsonl(tmp_path / "renamed.jsonl", renamed[:2])
    g = write_jsonl(tmp_path / "body.jsonl", renamed[2:])
    _, got = _tokens(f, tok, field_map=cfg.field_map)
    _, want = _tokens(write_jsonl(tmp_path / "canon.jsonl", [RECORDS[0], RECORDS[3]]), tok)
    assert got == want
    _, got_t = _tokens(g, tok, field_map=cfg_text.field_map)
    _, want_t = _tokens(write_jsonl(tmp_path / "canon_t.jsonl", [RECORDS[6]]), tok)
    assert got_t == want_t
    with pytest.raises(HorizonError, match="neither 'text' nor 'messages'"):
        _tokens(g, tok)  # without the map the field is unknown


BAD = [
    ("{not json", "invalid JSON"),
    ('{"messages": "hi"}', "field 'messages': must be a non-empty list of messages"),
    ('{"messages": [{"role": "user"}]}', "field 'messages': message 0 has no 'content'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "field 'messages': message 0 'content' must be a string"),
    ('{"conversations": [{"from": "alien", "value": "x"}]}', "field 'conversations': turn 0 has unknown speaker 'alien'"),
    ('{"instruction": "x"}', "field 'output': missing"),
    ('{"prompt": "x"}', "field 'completion': missing"),
    ('{"text": 5}', "field 'text': must be a string, got int"),
    ('{"text": ""}', "field 'text': is empty"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": "{oops"}',
     "field 'tools': not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"foo": 1}', "neither 'text' nor 'messages'"),
]


@pytest.mark.parametrize("line,needle", BAD)
def test_a_bad_record_is_one_line_naming_file_record_and_field(tmp_path, model, line, needle):
    _, tok, _ = model
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "a good one"}) + "\n" + line + "\n")
    with pytest.raises(HorizonError) as e:
        token_file(f, tok)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{f}:2: ") and needle in msg, msg


def test_skip_bad_records_counts_and_reports_them(tmp_path, model):
    _, tok, _ = model
    good = [json.dumps(r) for r in RECORDS]
    lines = []
    for i, (bad, _) in enumerate(BAD):
        lines += [good[i % len(good)], bad]
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(lines) + "\n")
    tf = token_file(f, tok, skip_bad_records=True)
    assert tf.bad_records == len(BAD) and tf.n_records == 2 * len(BAD) and tf.n_docs == len(BAD)
    assert tf.bad_examples[0].startswith(f"{f}:2: invalid JSON")
    assert len(tf.bad_examples) == 5 and all("\n" not in x for x in tf.bad_examples)
    # The counts survive the cache, and the run's report states them.
    again = token_file(f, tok, skip_bad_records=True)
    assert again.bad_records == len(BAD) and again.bad_examples == tf.bad_examples
    td = load_training_data(DataConfig(data=[str(f)], skip_bad_records=True), tok, seq_len=256, seed=0)
    assert td.bad_records == len(BAD)
    assert any(line.startswith(f"skipped {len(BAD)} bad records of {2 * len(BAD)}") for line in td.report_lines())


def test_bad_records_in_parquet_and_arrays_name_the_record(tmp_path, model):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    _, tok, _ = model
    pq.write_table(pa.Table.from_pylist([{"text": "fine", "other": None}, {"text": None, "other": "x"}]),
                   tmp_path / "b.parquet")
    with pytest.raises(HorizonError) as e:
        token_file(tmp_path / "b.parquet", tok)
    assert str(e.value).startswith(f"{tmp_path / 'b.parquet'}: record 2: object has neither 'text' nor 'messages'")
    (tmp_path / "b.json").write_text(json.dumps([{"text": "fine"}, {"text": "ok"}, {"prompt": 1, "completion": "x"}]))
    with pytest.raises(HorizonError, match=r"b\.json: record 3: field 'prompt': must be a string or a list"):
        token_file(tmp_path / "b.json", tok)


def test_dataset_dict_splits_and_directory_scan(tmp_path, model):
    datasets = pytest.importorskip("datasets")
    _, tok, _ = model
    train = {k: [r.get(k) for r in RECORDS[:4]] for k in ("messages", "tools", "conversations", "system", "instruction", "input", "output")}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(train),
                               "test": datasets.Dataset.from_list([RECORDS[0]])})
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = DataConfig(data=[str(tmp_path / "dd")], eval_data=[str(tmp_path / "dd")])
    td = load_training_data(cfg, tok, seq_len=256, seed=0, fallback_dir=tmp_path / "cache")
    assert td.train.counts["documents"] == 4 and td.eval.counts["documents"] == 1
    _, want = _tokens(write_jsonl(tmp_path / "t.jsonl", [RECORDS[0]]), tok)
    ids, mask = want[0]
    (b_ids, b_labels, b_pos), = [tuple(x) for x in td.eval_batches(4)]
    n = len(ids)
    assert b_ids[0, :n].tolist() == ids
    assert b_labels[0, :n].tolist() == [-100] + [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
    # A directory of data is scanned for Parquet files and dataset directories too.
    scan = tmp_path / "scan"
    scan.mkdir()
    twins = _twins(scan, RECORDS[5:7])
    twins["json"].unlink()  # a .json is not picked up when scanning; drop it to count exactly
    from horizon.data import data_files

    assert sorted(p.name for p in data_files([scan])) == ["d.jsonl", "d.parquet", "d_hf"]


def test_missing_pyarrow_is_one_line(tmp_path, model, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    _, tok, _ = model
    pq.write_table(pa.Table.from_pylist([{"text": "x"}]), tmp_path / "x.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(HorizonError, match=r"needs pyarrow \(pip install pyarrow\)"):
        token_file(tmp_path / "x.parquet", tok)


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("kwargs,message", [
    ({"eval_fraction": 1.5}, "--eval-fraction must be a finite number > 0.0 and < 1.0, got 1.5"),
    ({"eval_fraction": 0}, "--eval-fraction must be a finite number > 0.0 and < 1.0, got 0"),
    ({"eval_fraction": 0.1, "eval_data": ["x"]}, "--eval-fraction and --eval-data exclude each other; give one"),
    ({"eval_every": -1}, "--eval-every must be an integer >= 0, got -1"),
    ({"packing": "maybe"}, "--packing must be one of on, off, got 'maybe'"),
    ({"long_documents": "cut"}, "--long-documents must be one of truncate, split, drop, got 'cut'"),
    ({"field_map": "messages"}, "--field-map takes OURS=THEIRS pairs separated by commas, got 'messages'"),
    ({"field_map": "bogus=x"}, "--field-map: unknown field 'bogus'"),
    ({"field_map": "text=a,prompt=a"}, "--field-map: 'a' is mapped to both 'text' and 'prompt'"),
    ({"skip_bad_records": "yes"}, "--skip-bad-records must be true or false, got 'yes'"),
    ({"data": [3]}, "--data must be a path or a list of paths, got [3]"),
])
def test_data_options_validate_with_one_line_naming_the_flag(kwargs, message):
    with pytest.raises(HorizonError) as e:
        DataConfig(**kwargs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_every_data_option_has_a_default_and_a_one_line_help():
    cfg = DataConfig()
    for f in dataclasses.fields(DataConfig):
        h = f.metadata.get("help")
        assert isinstance(h, str) and h and "\n" not in h, f.name
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    assert (cfg.packing, cfg.long_documents, cfg.eval_fraction, cfg.skip_bad_records) == ("on", "split", None, False)
    assert DataConfig(packing=False).packing == "off"
    assert DataConfig(field_map="messages=dialog, content=text").field_map == {"messages": "dialog", "content": "text"}
    assert DataConfig.from_dict(DataConfig(eval_fraction=0.25).to_dict()) == DataConfig(eval_fraction=0.25)
