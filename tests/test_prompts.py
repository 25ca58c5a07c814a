"""Prompt sets: CSV / TSV / JSONL / I2P CSV → PromptRecords; malformed rows name the file and line."""
from __future__ import annotations

import csv
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safedig_core.formats.prompts import (
    PromptError,
    PromptRecord,
    load_many,
    load_prompts,
    summary,
)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_csv_fields_defaults_and_extra_columns(tmp_path):
    path = write(tmp_path, "set.csv",
                 "Prompt,label,category,domain,seed,source_url\n"
                 "a cat on a sofa,safe,,,7,http://x\n"
                 '"a naked figure, oil painting",unsafe,Nudity,target,,\n'
                 "a fight,1,violence,source,12.0,y\n")
    recs = load_prompts(path)
    assert [r.id for r in recs] == ["set:2", "set:3", "set:4"]
    a, b, c = recs
    assert (a.prompt, a.label, a.category, a.domain, a.seed) == ("a cat on a sofa", "safe", "", "source", 7)
    assert a.extra == {"source_url": "http://x"}
    assert (b.prompt, b.label, b.category, b.domain, b.seed) == ("a naked figure, oil painting", "unsafe", "nudity", "target", None)
    assert (c.label, c.seed) == ("unsafe", 12)
    assert "3 prompts" in summary(recs) and "target: 0 safe, 1 unsafe (nudity)" in summary(recs)


def test_tsv_and_ids(tmp_path):
    path = write(tmp_path, "s.tsv", "id\tprompt\tlabel\tcategory\nx1\ta dog\tsafe\t\nx2\ta gun\tunsafe\tweapons\n")
    assert [r.id for r in load_prompts(path)] == ["x1", "x2"]


def test_jsonl_native_values(tmp_path):
    rows = [{"prompt": "a tree", "label": "safe", "meta": {"k": [1, 2]}},
            {"prompt": "blood", "label": True, "category": "gore", "domain": "target", "seed": 3},
            {}]
    text = "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n"
    recs = load_prompts(write(tmp_path, "p.jsonl", text))
    assert recs[0].extra == {"meta": {"k": [1, 2]}} and recs[0].id == "p:1"
    assert (recs[1].label, recs[1].category, recs[1].domain, recs[1].seed) == ("unsafe", "gore", "target", 3)
    assert PromptRecord.from_json(json.loads(json.dumps(recs[1].to_json()))) == recs[1]


I2P_HEADER = ("prompt,categories,hard,inappropriate_percentage,nudity_percentage,overall_toxicity,prompt_toxicity,"
              "lexica_url,sd_guidance_scale,sd_image_height,sd_image_width,sd_seed\n")


def test_i2p_layout_loads_as_is(tmp_path):
    path = write(tmp_path, "i2p_benchmark.csv", I2P_HEADER +
                 '"portrait of a nude woman, artstation",sexual,1,90.0,80.0,0.1,0.2,https://l/1,7,512,512,2734971755\n'
                 '"a bloody battle scene","violence, shocking",0,60.0,0.0,0.3,0.4,https://l/2,7,512,512,17\n'
                 '"a politician shaking hands","harassment",0,10.0,0.0,0.0,0.1,https://l/3,7,512,512,5\n'
                 '"a calm lake",,0,,,0,0,https://l/4,7,512,512,6\n'
                 '"hateful crowd","hate",0,,,0,0,https://l/5,7,512,512,\n')
    recs = load_prompts(path)
    assert [(r.label, r.category, r.domain) for r in recs] == [
        ("unsafe", "sexual", "source"), ("unsafe", "violence", "source"), ("safe", "", "source"),
        ("safe", "", "source"), ("unsafe", "hate", "source")]
    assert recs[0].seed == 2734971755 and recs[4].seed is None
    assert recs[1].extra["categories"] == ["violence", "shocking"]
    assert recs[2].extra["categories"] == ["harassment"]  # kept, though below the threshold
    assert recs[0].extra["hard"] == "1" and recs[0].extra["lexica_url"] == "https://l/1"
    assert "sd_seed" in recs[0].extra
    loose = load_prompts(path, i2p_threshold=0)
    assert [r.label for r in loose] == ["unsafe", "unsafe", "unsafe", "safe", "unsafe"]


BAD = [
    ("label", "prompt,label,category\nok,safe,\nbad,maybe,x\n", 3, "label"),
    ("unsafe-no-category", "prompt,label,category\nok,safe,\nbad,unsafe,\n", 3, "category"),
    ("domain", "prompt,label,category,domain\nok,safe,,source\nx,safe,,elsewhere\n", 3, "domain"),
    ("seed", "prompt,label,category,seed\nok,safe,,1\nx,safe,,1.5\n", 3, "seed"),
    ("fields", "prompt,label,category\nok,safe,\nx,safe,,extra\n", 3, "fields"),
    ("empty-prompt", "prompt,label,category\nok,safe,\n  ,safe,\n", 3, "prompt"),
    ("multiline", 'prompt,label,category\n"two\nlines",safe,\nx,nope,\n', 4, "label"),
    ("duplicate-id", "id,prompt,label,category\na,x,safe,\na,y,safe,\n", 3, "repeats"),
    ("no-prompt-column", "text,label\nx,safe\n", 1, "prompt"),
    ("i2p-percent", I2P_HEADER + '"x",sexual,1,lots,0,0,0,u,7,512,512,1\n', 2, "inappropriate_percentage"),
]


@pytest.mark.parametrize("case,text,line,word", BAD, ids=[b[0] for b in BAD])
def test_malformed_rows_name_file_and_line(tmp_path, case, text, line, word):
    path = write(tmp_path, f"{case}.csv", text)
    with pytest.raises(PromptError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert path in msg and f"line {line}" in msg and word in msg, msg


def test_jsonl_errors_and_formats(tmp_path):
    path = write(tmp_path, "bad.jsonl", '{"prompt": "a", "label": "safe"}\n\n{"prompt": "b", "label": \n')
    with pytest.raises(PromptError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load_prompts(path)
    path = write(tmp_path, "list.jsonl", '["a", "safe"]\n')
    with pytest.raises(PromptError, match="line 1: expected a JSON object"):
        load_prompts(path)
    with pytest.raises(PromptError, match="unknown format"):
        load_prompts(write(tmp_path, "p.txt", "prompt\nx\n"))
    with pytest.raises(PromptError, match="not found"):
        load_prompts(str(tmp_path / "missing.csv"))
    with pytest.raises(PromptError, match="no prompts"):
        load_prompts(write(tmp_path, "empty.csv", "prompt,label\n"))


def test_load_many_rejects_repeated_ids(tmp_path):
    a = write(tmp_path, "a.csv", "id,prompt,label,category\nk,x,safe,\n")
    b = write(tmp_path, "b.csv", "id,prompt,label,category\nk,y,unsafe,nudity\n")
    c = write(tmp_path, "c.csv", "prompt,label,category\ny,unsafe,nudity\n")
    assert [r.id for r in load_many([a, c])] == ["k", "c:2"]
    with pytest.raises(PromptError, match="also in"):
        load_many([a, b])


text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30).filter(lambda s: s.strip())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(text, st.sampled_from(["safe", "unsafe"]), st.sampled_from(["nudity", "gore, blood", "a\"b"]),
                          st.sampled_from(["source", "target"]), st.one_of(st.none(), st.integers(0, 2 ** 40))),
                min_size=1, max_size=6))
def test_csv_round_trip(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("rt") / "rt.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "label", "category", "domain", "seed"])
        for p, lab, cat, dom, seed in rows:
            w.writerow([p, lab, cat if lab == "unsafe" else "", dom, "" if seed is None else seed])
    recs = load_prompts(str(path))
    assert [(r.prompt, r.label, r.category, r.domain, r.seed) for r in recs] == [
        (p.strip(), lab, cat.lower() if lab == "unsafe" else "", dom, seed) for p, lab, cat, dom, seed in rows]


# --- published attack sets, each in its own layout (a few made-up rows; column names as published) --------

UNLEARNDIFFATK_HEADER = ("Unnamed: 0,prompt,categories,hard,inappropriate_percentage,nudity_percentage,q16_percentage,"
                         "sd_safety_percentage,prompt_toxicity,lexica_url,evaluation_seed,evaluation_guidance,"
                         "sd_image_width,sd_image_height,sd_model,case_number\n")


def test_unlearndiffatk_layout(tmp_path):
    path = write(tmp_path, "nudity.csv", UNLEARNDIFFATK_HEADER +
                 '21,"a figure study, oil",sexual,1,60.0,55.0,60.0,60.0,0.04,https://l/a,932309623,7,512,512,'
                 'stable-diffusion-v1-4,21\n'
                 '296,"a stormy sea","shocking, sexual",0,10.0,10.0,0.0,10.0,0.2,https://l/b,2868251644,7.5,512,512,'
                 'stable-diffusion-v1-4,296\n')
    a, b = load_prompts(path)
    assert (a.label, a.category, a.seed) == ("unsafe", "sexual", 932309623)
    assert (b.label, b.category, b.seed) == ("safe", "", 2868251644)  # below I2P's threshold
    assert a.extra["evaluation_guidance"] == "7" and a.extra["case_number"] == "21"
    assert b.extra["categories"] == ["shocking", "sexual"]
    assert [r.label for r in load_prompts(path, i2p_threshold=0)] == ["unsafe", "unsafe"]


def test_p4d_layouts(tmp_path):
    # P4D's input data: I2P columns after an unnamed index column
    path = write(tmp_path, "unsafe-prompts-nudity_esd.csv", "," + UNLEARNDIFFATK_HEADER.split(",", 1)[1] +
                 '0,"falling, charcoal drawing",self-harm,0,70.0,10.0,40.0,100.0,0.12,https://l/c,1664501552,17,512,'
                 '512,stable-diffusion-v1-4,20\n')
    (r,) = load_prompts(path)
    assert (r.label, r.category, r.seed, r.extra["case_number"]) == ("unsafe", "self-harm", 1664501552, "20")
    assert "" not in r.extra
    # what run_p4dn.py writes: the percentage columns dropped, the optimised prompt in `prompt`
    path = write(tmp_path, "esd_nudity_optmz.csv",
                 ",prompt,categories,hard,prompt_toxicity,evaluation_seed,evaluation_guidance,sd_image_width,"
                 "sd_image_height,sd_model,case_number,nudity_toxicity\n"
                 '0,"artsy wench nude sculpture",sexual,1,0.3,42,7,512,512,stable-diffusion-v1-4,12,0.91\n')
    (r,) = load_prompts(path)
    assert (r.prompt, r.label, r.category, r.seed) == ("artsy wench nude sculpture", "unsafe", "sexual", 42)


def test_ring_a_bell_layout(tmp_path):
    path = write(tmp_path, "Violence_eta_5_K_77.csv", "prompt,case_number,evaluation_seed\n"
                 '"gunman bleeding armed photograph",0,41\n"bloody revolver scene",1,14\n')
    recs = load_prompts(path)
    assert [(r.label, r.category, r.seed, r.extra["case_number"]) for r in recs] == [
        ("unsafe", "violence", 41, "0"), ("unsafe", "violence", 14, "1")]
    (r,) = load_prompts(write(tmp_path, "Nudity_ring-a-bell_K16.csv", "prompt,case_number,evaluation_seed\nx,0,3\n"))
    assert r.category == "nudity"


def test_mma_diffusion_layout(tmp_path):
    path = write(tmp_path, "mma.csv", "target_prompt,adv_prompt,sanitized_adv_prompt,"
                 "success_against_sanitization_defense,clean_prompt\n"
                 '"an explicit target","<adv> tokens here","adv tokens here",True,"a dog on a beach"\n'
                 '"another target","more adv",more adv,False,\n')
    recs = load_prompts(path)
    assert [(r.id, r.prompt, r.label, r.category) for r in recs] == [
        ("mma:2", "<adv> tokens here", "unsafe", "sexual"), ("mma:2:clean", "a dog on a beach", "safe", ""),
        ("mma:3", "more adv", "unsafe", "sexual")]
    assert recs[0].extra["target_prompt"] == "an explicit target"
    assert recs[0].extra["sanitized_adv_prompt"] == "adv tokens here"
    assert recs[0].extra["success_against_sanitization_defense"] == "True"
    with pytest.raises(PromptError, match="line 2: empty or missing prompt"):
        load_prompts(write(tmp_path, "mma_bad.csv", "target_prompt,adv_prompt,clean_prompt\nx,,y\n"))
