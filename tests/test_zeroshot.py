"""Zero-shot evaluation (issues 6, 17): offline task configs, errors, data checks, the WikiText conventions,
and an end-to-end check of the scoring with a model forced to prefer the gold answer."""
from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moebits import zeroshot as zs  # noqa: E402
from moebits.data import DataError, load_text, wikitext_documents, wikitext_gptq_text, wikitext_rows  # noqa: E402

DATA = Path(os.environ["MOEBITS_DATA"]) if os.environ.get("MOEBITS_DATA") else \
    Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"evaluation data folder {DATA} absent "
                                "(set MOEBITS_DATA or put the data at ../shared/data relative to the repo)")
LIMIT = 8


# ----------------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The quick brown fox jumps over the lazy dog.", "Question: What is a man doing?\nAnswer: sitting"] * 50
    if DATA.is_dir():
        text += (DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")[:100_000].split("\n")
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def tiny_moe(vocab_size: int, window: int = 2048):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=window,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------- names and errors


def test_parse_tasks():
    assert zs.parse_tasks("all") == list(zs.TASKS)
    assert zs.parse_tasks("piqa, arc_easy,piqa") == ["piqa", "arc_easy"]
    assert zs.parse_tasks(["winogrande", "lambada_standard"]) == ["winogrande", "lambada_standard"]
    with pytest.raises(ValueError, match="unknown task 'mmlu'; supported tasks: wikitext2, wikitext, lambada_openai"):
        zs.parse_tasks("piqa,mmlu")


def test_unknown_task_error_lists_supported(tmp_path):
    with pytest.raises(ValueError) as e:
        zs.evaluate_tasks(None, None, ["boolq"], tmp_path)
    assert all(t in str(e.value) for t in zs.TASKS)


def test_limit_must_be_a_positive_count(tmp_path):
    for bad in (0, 0.5, -3):
        with pytest.raises(ValueError, match="limit must be a positive number"):
            zs.evaluate_tasks(None, None, "piqa", tmp_path, limit=bad)


def test_missing_data_folder_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zs.evaluate_tasks(None, None, "piqa", tmp_path / "nowhere")


def test_missing_task_file_lists_available_tasks(tmp_path):
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "ARC-Easy-Test.jsonl").write_text("{}\n")
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text("{}\n")  # labels file missing
    with pytest.raises(FileNotFoundError) as e:
        zs.evaluate_tasks(None, None, "arc_easy,piqa,winogrande", tmp_path)
    msg = str(e.value)
    assert "piqa: piqa/valid-labels.lst" in msg and "winogrande: winogrande/winogrande_xl_validation.jsonl" in msg
    assert msg.endswith("Tasks available in that folder: arc_easy")
    assert zs.available_tasks(tmp_path) == ["arc_easy"]


def test_default_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBITS_DATA", str(tmp_path))
    assert zs.default_data_dir() == tmp_path
    monkeypatch.delenv("MOEBITS_DATA")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert zs.default_data_dir() == (tmp_path / "shared" / "data").resolve()
    monkeypatch.chdir(tmp_path)
    assert zs.default_data_dir() is None
    with pytest.raises(FileNotFoundError, match="pass --data DIR"):
        zs.evaluate_tasks(None, None, "piqa")


# ------------------------------------------------------------- configs mirror the official lm-eval tasks

OFFICIAL_YAML = {"lambada_openai": "lambada/lambada_openai.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                 "piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                 "winogrande": "winogrande/default.yaml"}


def _import_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"_official_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_config(task: str) -> dict:
    """The installed lm-eval's own YAML of `task` (includes merged, `!function` resolved)."""
    lm_eval = pytest.importorskip("lm_eval")
    import yaml

    def load(path: Path) -> dict:
        class Loader(yaml.SafeLoader):
            pass

        def function(loader, node):
            module, name = loader.construct_scalar(node).rsplit(".", 1)
            return getattr(_import_file(path.parent / f"{module}.py"), name)

        Loader.add_constructor("!function", function)
        cfg = yaml.load(path.read_text(), Loader=Loader)
        if "include" in cfg:
            cfg = {**load(path.parent / cfg.pop("include")), **cfg}
        return cfg

    return load(Path(lm_eval.__file__).parent / "tasks" / OFFICIAL_YAML[task])


@pytest.mark.parametrize("task", list(OFFICIAL_YAML))
def test_config_mirrors_official_task(task, tmp_path):
    official, ours = official_config(task), zs.task_config(task, tmp_path)
    for key in ("output_type", "metric_list", "target_delimiter", "fewshot_delimiter", "num_fewshot",
                "process_results", "filter_list", "generation_kwargs"):
        assert ours.get(key) == official.get(key), key
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        if isinstance(official.get(key), str) or official.get(key) is None:
            assert ours.get(key) == official.get(key), key
    assert (ours["test_split"] if "test_split" in ours else ours["validation_split"]) in (
        official.get("test_split"), official.get("validation_split"))


def test_winogrande_functions_match_official():
    docs = [{"sentence": "Sarah was a better surgeon than Maria so _ always got the harder cases.",
             "option1": "Sarah", "option2": "Maria", "answer": "1"},
            {"sentence": "The trophy didn't fit in the suitcase because _ was too big.", "option1": "trophy",
             "option2": "suitcase", "answer": "2"}]
    if DATA.is_dir():
        with open(DATA / "winogrande" / "winogrande_xl_validation.jsonl") as f:
            docs += [json.loads(line) for line in f][:200]
    official, ours = official_config("winogrande"), zs.task_config("winogrande", DATA)
    for doc in docs:
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            assert ours[key](doc) == official[key](doc)


HUB_HELLASWAG = [
    {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"},
    {"activity_label": "Layup drill in basketball", "ctx_a": "A graphic shows on the screen.",
     "ctx_b": "some young men on an indoor court", "endings": ["a", "b", "c", "d"], "label": "0"},
    {"activity_label": "Home and Garden", "ctx_a": "[header] How to choose a solar inverter [title] Learn about "
     "inverters. [step] There are three major types.", "ctx_b": "", "label": "1",
     "endings": ["[substeps] Grid-tie inverters are common.", "Off-grid ones [title] store power.", "y", "z"]},
]


def llamacpp_doc(hub: dict) -> dict:
    """A hub (original-layout) document as the llama.cpp variant stores it: the context cleaned without ctx_b's
    capitalisation, each ending cleaned *and stripped* (the file's endings never start with a space)."""
    clean = zs.hellaswag_preprocess
    return {"ctx": clean(hub["activity_label"] + ": " + hub["ctx_a"] + " " + hub["ctx_b"]),
            "endings": [clean(e).strip() for e in hub["endings"]], "label": int(hub["label"])}


def test_hellaswag_llamacpp_variant_vs_official_preprocessing():
    """Queries are rebuilt exactly; an ending that began with a tag loses the leading space lm-eval keeps (the
    stated deviation), every other ending is identical."""
    datasets = pytest.importorskip("datasets")
    official = official_config("hellaswag")["process_docs"](datasets.Dataset.from_list(HUB_HELLASWAG))
    local = [llamacpp_doc(d) for d in HUB_HELLASWAG]
    ours = zs.task_config("hellaswag", DATA)["process_docs"](datasets.Dataset.from_list(local))
    assert ours["query"] == official["query"]
    assert ours["query"][0] == "Roof shingle removal: A man is sitting on a roof. He"
    for doc_ours, doc_official, hub in zip(ours["choices"], official["choices"], HUB_HELLASWAG):
        for a, b, raw in zip(doc_ours, doc_official, hub["endings"]):
            if raw.startswith("["):
                assert b == " " + a, (a, b)  # lm-eval scores "  Grid-tie..." (delimiter + space), we " Grid-tie..."
            else:
                assert a == b
    assert official["choices"][2][0] == " Grid-tie inverters are common."


@needs_data
def test_local_hellaswag_file_is_the_llamacpp_variant():
    """The shared file really is the cleaned variant (so the deviation note applies): no bracket tags, no ending
    that starts with a space, and the layout is detected as such."""
    path = DATA / zs.DATA_FILES["hellaswag"][0]
    assert zs.hellaswag_layout(path) == "llama.cpp"
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    assert len(docs) == 10042
    assert not any(re.search(r"\[(title|step|header|substeps)\]", d["ctx"] + " ".join(d["endings"])) for d in docs)
    assert not any(e.startswith(" ") for d in docs for e in d["endings"])


def test_hellaswag_original_layout_uses_lm_eval_preprocessing(tmp_path):
    lm_utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    (tmp_path / "hellaswag").mkdir()
    rows = [{"ind": i, "ctx": "ignored", "split": "val", "source_id": "x", **d} for i, d in enumerate(HUB_HELLASWAG)]
    (tmp_path / "hellaswag" / "hellaswag_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert zs.hellaswag_layout(tmp_path / "hellaswag" / "hellaswag_val.jsonl") == "original"
    assert zs.task_config("hellaswag", tmp_path)["process_docs"] is lm_utils.process_docs
    (tmp_path / "hellaswag" / "hellaswag_val.jsonl").write_text('{"question": "?", "answers": []}\n')
    with pytest.raises(DataError, match="unknown HellaSwag layout"):
        zs.hellaswag_layout(tmp_path / "hellaswag" / "hellaswag_val.jsonl")


# ------------------------------------------------------------------------------------------ WikiText

def test_wikitext_rows_and_gptq_text_match_a_line_iterator():
    """Rows as the HF `wikitext` builder yields them (iterate the file, keep the newline, blank -> ""), joined by
    GPTQ's "\n\n"; checked against Python's own line iteration, with form feeds that str.splitlines would cut."""
    raw = " = A = \n \n Text one \x0c more . \n\n = = B = = \n tail"
    rows = [line if line.strip() else "" for line in io.StringIO(raw, newline="\n")]
    assert wikitext_rows(raw) == rows == [" = A = \n", "", " Text one \x0c more . \n", "", " = = B = = \n", " tail"]
    assert wikitext_gptq_text(raw) == "\n\n".join(rows)


def test_wikitext_documents_cut_at_top_level_headings():
    raw = " \n = A = \n \n x . \n = = Sub = = \n y \n = B = \n z \n"
    docs = wikitext_documents(raw)
    # the leading blank line forms its own whitespace-only document, which is dropped
    assert docs == [" = A = \n \n x . \n = = Sub = = \n y ", " = B = \n z \n"]


@needs_data
def test_wikitext2_gptq_text_counts(tmp_path):
    """GPTQ's text of the local wiki.test.raw: 1,294,336 characters, 11,605 newlines (raw file: 1,288,556 / 4,358);
    load_text gives it for a WikiText raw file, and `rawfile:` the file verbatim."""
    path = DATA / "wikitext2" / "wiki.test.raw"
    raw = path.read_text(encoding="utf-8")
    assert (len(raw), raw.count("\n")) == (1_288_556, 4_358)
    text = wikitext_gptq_text(raw)
    assert (len(text), text.count("\n")) == (1_294_336, 11_605)
    assert load_text(str(path), "eval") == text
    assert load_text("rawfile:" + str(path), "eval") == raw
    other = tmp_path / "notes.raw"
    other.write_text(raw[:1000])
    assert load_text(str(other), "eval") == raw[:1000]  # only WikiText split names get the GPTQ rows
    docs = wikitext_documents(raw)
    assert raw.startswith(" \n = Robert Boulter = \n")  # the leading blank line is a whitespace-only document
    assert len(docs) == 62 and "\n".join(docs) == raw[2:]
    assert docs[0].startswith(" = Robert Boulter = \n") and docs[1].startswith(" = Du Fu = \n")


# ----------------------------------------------------------------------------------- end to end


@needs_data
def test_all_tasks_run_offline_and_score_in_unit_interval(tokenizer):
    from moebits.evaluate import perplexity

    model = tiny_moe(len(tokenizer))
    res = zs.evaluate_tasks(model, tokenizer, "all,lambada_standard", DATA, limit=LIMIT, seqlen=128, progress=False)
    assert set(res["tasks"]) == set(zs.TASKS)
    for task in zs.ACCURACY_TASKS:
        m = res["tasks"][task]
        assert m["n"] == LIMIT, task
        assert 0.0 <= m[zs.PRIMARY_METRIC[task]] <= 1.0, task
        assert 0.0 <= m["acc"] <= 1.0, task
    assert res["tasks"]["lambada_openai"]["perplexity"] > 1.0
    wt = res["tasks"]["wikitext2"]
    assert wt["windows"] == LIMIT and wt["seqlen"] == 128 and wt["convention"] == "gptq"
    # the first windows of GPTQ's text = those of a prefix of it cut at a row end (byte-level BPE is per word);
    # built here from the raw lines directly, not through moebits.data
    lines = (DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")[:300]
    head = "\n\n".join(line + "\n" if line.strip() else "" for line in lines)
    ids = tokenizer(head[:head.rindex("\n")], return_tensors="pt").input_ids[0]
    assert ids.numel() > LIMIT * 128
    assert wt["ppl"] == pytest.approx(perplexity(model, ids, 128, max_windows=LIMIT, progress=False).ppl)
    wl = res["tasks"]["wikitext"]
    assert wl["n"] == LIMIT and wl["word_perplexity"] > wl["byte_perplexity"] > 1.0
    assert wl["bits_per_byte"] == pytest.approx(math.log2(wl["byte_perplexity"]))
    avg = res["average"]
    assert avg["tasks"] == list(zs.ACCURACY_TASKS) and avg["label"] == "Avg (6 tasks, no LS)"
    for metric in ("acc", "acc_norm"):
        scores = [res["tasks"][t]["acc_norm" if metric == "acc_norm" and "acc_norm" in res["tasks"][t] else "acc"]
                  for t in zs.ACCURACY_TASKS]
        assert avg[metric] == pytest.approx(sum(scores) / len(scores))
    assert "lambada_standard" in res["skipped"] and any("lambada_standard" in n for n in res["notes"])
    assert zs.HELLASWAG_DEVIATION in res["notes"]
    row = {"model": "tiny", "method": "fp32", "bits": "16-16", "result": res}
    table = zs.format_table([row])
    assert table.splitlines()[0] == ("| Model | Method | #Bits (W-A) | Metric | AC | AE | HS | LO | LS | PQ | WG | "
                                     "Avg (6 tasks, no LS) | PPL | W-PPL |")
    assert table.splitlines()[2].startswith("| tiny | fp32 | 16-16 | acc_norm | ")
    assert "| n/a |" in table and f"first {LIMIT} documents" in table and "GPTQ convention" in table
    assert "llama.cpp variant" in table and "lm-eval's wikitext task" in table
    both = zs.format_table([row], metric="both").splitlines()
    assert [line.split(" | ")[3] for line in both[2:4]] == ["acc", "acc_norm"]
    assert both[2].split(" | ")[11] == f"{100 * avg['acc']:.2f}"
    assert both[3].split(" | ")[11] == f"{100 * avg['acc_norm']:.2f}"


@needs_data
def test_wikitext_task_matches_an_independent_computation(tokenizer):
    """lm-eval's wikitext task on the local file: the first article (as EleutherAI's document-level data set cuts it),
    lm-eval's detokenizer, scored in one window here ([prefix] + tokens) and turned into word/byte perplexity."""
    detokenize = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext").wikitext_detokenizer
    model = tiny_moe(len(tokenizer), window=4096)
    res = zs.evaluate_tasks(model, tokenizer, "wikitext", DATA, limit=1, progress=False)
    got = res["tasks"]["wikitext"]
    raw = (DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    # article 1: from its heading to the "\n" before article 2's heading (the file's first line is blank, dropped)
    page = raw[raw.index(" = Robert Boulter = "):raw.index(" = Du Fu = ") - 1]
    ids = tokenizer(detokenize({"page": page}), add_special_tokens=False).input_ids
    assert len(ids) < 4096
    inp = torch.tensor([[tokenizer.bos_token_id] + ids[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=inp).logits.double(), -1)[0]
    loglik = logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
    words, nbytes = len(re.split(r"\s+", page)), len(page.encode("utf-8"))
    assert got["n"] == 1
    assert got["word_perplexity"] == pytest.approx(math.exp(-loglik / words), rel=1e-4)
    assert got["byte_perplexity"] == pytest.approx(math.exp(-loglik / nbytes), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(-loglik / nbytes / math.log(2), rel=1e-4)


def _lines(path: Path, n: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [next(f) for _ in range(n)]


def answer_pairs(task: str, n: int, wrong: bool = False) -> list[tuple[str, str]]:
    """(context, continuation) of the gold answer -- or, with `wrong`, of a wrong answer -- of the first `n`
    documents, built straight from the raw files with the prompts of the official tasks."""
    files = zs.DATA_FILES[task]
    docs = [json.loads(line) for line in _lines(DATA / files[0], n)]
    pairs = []
    for i, d in enumerate(docs):
        if task == "lambada_openai":
            *head, last = d["text"].split(" ")
            pairs.append((" ".join(head), " ~~~~" if wrong else " " + last))
        elif task == "hellaswag":
            k = (d["label"] + wrong) % len(d["endings"])
            pairs.append((zs.hellaswag_query(d["ctx"]), " " + zs.hellaswag_preprocess(d["endings"][k])))
        elif task == "piqa":
            label = int(_lines(DATA / files[1], n)[i]) ^ wrong
            pairs.append((f"Question: {d['goal']}\nAnswer:", " " + d[f"sol{label + 1}"]))
        elif task in ("arc_easy", "arc_challenge"):
            k = (d["choices"]["label"].index(d["answerKey"]) + wrong) % len(d["choices"]["text"])
            pairs.append((f"Question: {d['question']}\nAnswer:", " " + d["choices"]["text"][k]))
        elif task == "winogrande":
            blank = d["sentence"].index("_")
            option = d["option" + str((int(d["answer"]) - 1 + wrong) % 2 + 1)]
            pairs.append((d["sentence"][:blank] + option, " " + d["sentence"][blank + 1:].strip()))
    return pairs


def force_continuations(model, tokenizer, pairs, boost: float = 100.0):
    """Hook `model` so that, whenever its input starts with the tokens of ``context`` plus a part of
    ``continuation`` of one of `pairs`, the logits there put (almost) all mass on the next token of that text. Scored by
    log-likelihood, the forced continuation then costs ~0 nats and any other continuation >= `boost` nats."""
    nxt: dict[tuple[int, ...], int] = {}
    for ctx, cont in pairs:
        ids = tokenizer(ctx + cont, add_special_tokens=False).input_ids
        start = len(tokenizer(ctx.rstrip(), add_special_tokens=False).input_ids)  # first continuation token
        for t in range(max(start, 1), len(ids)):
            assert nxt.setdefault(tuple(ids[:t]), ids[t]) == ids[t], "two forced texts disagree after one prefix"

    def hook(module, args, kwargs, output):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        logits = output.logits.clone()
        for b, row in enumerate(ids.tolist()):
            for t in range(len(row)):
                token = nxt.get(tuple(row[:t + 1]))
                if token is not None:
                    logits[b, t, token] += boost
        output.logits = logits
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


@needs_data
@pytest.mark.parametrize("wrong", [False, True], ids=["gold", "wrong"])
def test_model_forced_to_an_answer_scores_exactly(tokenizer, wrong):
    """End-to-end check of data loading, labels, prompts and choice scoring: a model forced to the gold answers
    (built independently from the raw files) scores 1.0 on every accuracy task; forced to a wrong answer, 0.0."""
    tasks = list(zs.ACCURACY_TASKS)
    model = tiny_moe(len(tokenizer))
    handle = force_continuations(model, tokenizer, [p for t in tasks for p in answer_pairs(t, LIMIT, wrong)])
    try:
        res = zs.evaluate_tasks(model, tokenizer, tasks, DATA, limit=LIMIT, progress=False)
    finally:
        handle.remove()
    expected = 0.0 if wrong else 1.0
    for task in tasks:
        m = res["tasks"][task]
        assert m["n"] == LIMIT
        assert m["acc"] == expected, (task, m)
        if "acc_norm" in m:
            assert m["acc_norm"] == expected, (task, m)
    assert res["average"]["acc"] == res["average"]["acc_norm"] == expected
    if not wrong:
        assert res["tasks"]["lambada_openai"]["perplexity"] == pytest.approx(1.0, abs=1e-3)


@needs_data
def test_answer_longer_than_the_model_window_is_scored_not_a_crash(tokenizer):
    """lm-eval asserts when a continuation exceeds the model's window (PIQA solutions vs a 256-token demo model);
    those requests are scored with a widened window and a note says how many."""
    model = tiny_moe(len(tokenizer), window=24)
    res = zs.evaluate_tasks(model, tokenizer, "piqa,wikitext2", DATA, limit=LIMIT, progress=False)
    assert res["tasks"]["piqa"]["n"] == LIMIT and 0.0 <= res["tasks"]["piqa"]["acc_norm"] <= 1.0
    assert any(n.startswith("piqa: ") and "longer than the model's 24-token window" in n for n in res["notes"])
    assert res["tasks"]["wikitext2"]["seqlen"] == 24
    assert any("max_position_embeddings 24; used 24" in n for n in res["notes"])


# ---------------------------------------------------------------------------------------- data checks


def _copy_data(dst: Path, tasks, truncate: dict[str, int] | None = None) -> Path:
    """A data folder with the files of `tasks`, each file in `truncate` cut to its first N lines."""
    for rel in {f for t in tasks for f in zs.DATA_FILES[t]}:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if truncate and rel in truncate:
            (dst / rel).write_text("".join(_lines(DATA / rel, truncate[rel])), encoding="utf-8")
        else:
            shutil.copyfile(DATA / rel, dst / rel)
    return dst


@needs_data
def test_official_files_pass_the_count_check():
    assert {rel: zs.count_documents(DATA / rel) for rel in zs.OFFICIAL_COUNTS} == zs.OFFICIAL_COUNTS
    assert zs.OFFICIAL_COUNTS["hellaswag/hellaswag_val.jsonl"] == 10042
    assert zs.OFFICIAL_COUNTS["piqa/valid.jsonl"] == 1838


@needs_data
def test_truncated_file_is_named_even_with_a_limit(tmp_path, tokenizer):
    root = _copy_data(tmp_path, ["piqa", "arc_easy"], truncate={"piqa/valid.jsonl": 100})
    with pytest.raises(DataError) as e:
        zs.evaluate_tasks(None, None, "arc_easy,piqa", root, limit=5)
    msg = str(e.value)
    assert f"{root / 'piqa' / 'valid.jsonl'} has 100 documents, the official split has 1,838" in msg
    assert "arc" not in msg.split("official split")[0] and "valid-labels" not in msg
    # a file of one's own can still be scored, on purpose; the labels file is then shorter than the questions
    res = zs.evaluate_tasks(tiny_moe(len(tokenizer)), tokenizer, "arc_easy", root, limit=3, progress=False,
                            check_counts=False)
    assert res["tasks"]["arc_easy"]["n"] == 3


@needs_data
def test_truncated_wikitext_and_hellaswag_are_named(tmp_path):
    root = _copy_data(tmp_path, ["wikitext2", "hellaswag"],
                      truncate={"wikitext2/wiki.test.raw": 4000, "hellaswag/hellaswag_val.jsonl": 10041})
    with pytest.raises(DataError) as e:
        zs.evaluate_tasks(None, None, "wikitext,hellaswag", root)
    msg = str(e.value)
    assert "wiki.test.raw has 4,000 lines, the official split has 4,358" in msg
    assert "hellaswag_val.jsonl has 10,041 documents, the official split has 10,042" in msg


def test_metric_choices(tmp_path):
    with pytest.raises(ValueError, match="metric must be one of acc, acc_norm, both"):
        zs.evaluate_tasks(None, None, "piqa", tmp_path, metric="f1")
    assert [zs.score_metric(t, "acc") for t in zs.ACCURACY_TASKS] == ["acc"] * 6
    assert [zs.score_metric(t, "acc_norm") for t in zs.ACCURACY_TASKS] == [
        "acc", "acc_norm", "acc_norm", "acc_norm", "acc_norm", "acc"]
    assert zs.average_label(["piqa", "winogrande"]) == "Avg (2 tasks, no AC/AE/HS/LO/LS)"
    avg = zs.summarize({"piqa": {"acc": 0.5, "acc_norm": 0.7}, "winogrande": {"acc": 0.6}, "wikitext2": {"ppl": 9.0},
                        "arc_easy": {"acc": None, "acc_norm": None}})
    assert (avg["acc"], avg["acc_norm"]) == (pytest.approx(0.55), pytest.approx(0.65))
    assert avg["tasks"] == ["piqa", "winogrande"] and avg["label"] == "Avg (2 tasks, no AC/AE/HS/LO/LS)"


@needs_data
def test_cli_eval_metric_both_and_count_errors(tmp_path):
    from typer.testing import CliRunner

    from moebits.cli import app

    runner = CliRunner()
    base = ["eval", "--model", "tiny:qwen2_moe", "--tasks", "piqa,winogrande", "--data", str(DATA), "--limit", "3"]
    r = runner.invoke(app, base + ["--metric", "both", "--out", str(tmp_path / "res.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["metric"] == "both" and res["average"]["label"] == "Avg (2 tasks, no AC/AE/HS/LO/LS)"
    piqa, wg = res["tasks"]["piqa"], res["tasks"]["winogrande"]
    assert res["average"]["acc"] == pytest.approx((piqa["acc"] + wg["acc"]) / 2)
    assert res["average"]["acc_norm"] == pytest.approx((piqa["acc_norm"] + wg["acc"]) / 2)
    assert "Avg (2 tasks, no" in r.output and "acc_norm" in r.output
    r = runner.invoke(app, base + ["--metric", "f1"])
    assert r.exit_code == 2 and "metric must be one of acc, acc_norm, both" in r.output
    root = _copy_data(tmp_path / "data", ["winogrande"], truncate={"winogrande/winogrande_xl_validation.jsonl": 7})
    r = runner.invoke(app, ["eval", "--model", "tiny:qwen2_moe", "--tasks", "winogrande", "--data", str(root)])
    assert r.exit_code == 2 and "has 7 documents, the official split has 1,267" in " ".join(r.output.split())
