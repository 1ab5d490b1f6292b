"""Annotation text end to end: a Sherlock-shaped spreadsheet -> per-TR text -> embeddings -> text again.

The table is written with pandas as .xlsx, shaped like the real Sherlock annotation file: trailing spaces in
headers, extra columns, blank cells, exact repeated rows, gaps between segments, a zero-length segment, and a last
segment that runs past the end of the film.
"""
import logging
import os
import subprocess
import sys
import types

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from giblet.data.embeddings import HashingEmbedder, SentenceTransformerEmbedder, embed_trs, nearest_text
from giblet.data.text import (SHERLOCK_TEXT_COLUMNS, SHERLOCK_TIME_COLUMNS, annotations_to_trs, load_annotations,
                              scene_starts)

TR, N_TRS = 1.5, 300
FILM = TR * N_TRS  # 450 s

# scene: (characters, location, in/outdoor, actions, objects, settings)
SCENES = [
    (["John", "Ella"], "Therapist's office", "Indoor",
     ["talks with", "avoids looking at", "answers", "listens to", "sighs at"],
     ["his therapist Ella", "the question about his blog", "the notepad on her knee", "the empty blog page",
      "the psychosomatic limp"], ["in the quiet office", "while rain taps the window", "across the low table"]),
    (["Lestrade", "Donovan", "Journalists"], "Police station press room", "Indoor",
     ["faces", "reads to", "dismisses", "glares at", "announces to"],
     ["the press conference", "the reporters about the serial suicides", "a text saying Wrong on every phone",
      "the cameras and microphones", "the question about the killer"], ["under bright flash bulbs", "at the long desk",
                                                                      "beside Sergeant Donovan"]),
    (["Sherlock", "Molly"], "St Bart's hospital morgue", "Indoor",
     ["whips", "examines", "asks Molly about", "flirts awkwardly over", "zips up"],
     ["the corpse on the slab", "the bruises on the body", "the riding crop", "the body bag", "a fresh cadaver"],
     ["in the cold morgue", "under the surgical lamp", "at the mortuary drawers"]),
    (["John", "Mike Stamford"], "Russell Square park", "Outdoor",
     ["sits with", "drinks coffee with", "jokes with", "remembers Afghanistan with", "limps beside"],
     ["his old friend Mike Stamford", "a paper cup of coffee", "the flatshare problem", "London rent prices",
      "the park bench"], ["under the plane trees", "in the autumn sunshine", "near the fountain"]),
    (["Sherlock", "John", "Mrs Hudson"], "221B Baker Street", "Indoor",
     ["tours", "tidies", "shows John", "clears", "points at"],
     ["the cluttered sitting room", "the skull on the mantelpiece", "the violin by the window",
      "the knife stuck in the letters", "the wallpaper with the smiley face"], ["at Baker Street", "in the flat",
                                                                               "while Mrs Hudson makes tea"]),
    (["Sherlock", "Lestrade", "Anderson", "John"], "Lauriston Gardens", "Indoor",
     ["kneels over", "deduces", "measures", "argues with Anderson about", "photographs"],
     ["the woman in pink", "the word Rache scratched on the floor", "her wedding ring", "her wet umbrella",
      "her missing pink suitcase"], ["in the derelict house", "by torchlight", "while Anderson sulks"]),
    (["Sherlock", "John"], "Streets of London at night", "Outdoor",
     ["chases", "runs after", "jumps across", "cuts through", "flags down"],
     ["the taxi through Soho", "the rooftops", "the narrow alley", "the stopped cab", "the passenger from America"],
     ["through the night streets", "past the neon signs", "at full sprint"]),
    (["Sherlock", "John", "Angelo"], "Angelo's restaurant", "Indoor",
     ["watches", "orders from", "waits beside", "stares through", "lights a candle with"],
     ["the window on Northumberland Street", "Angelo the owner", "the candle on the table",
      "the taxi parked outside", "the plate of pasta"], ["across the checked tablecloth", "during the stakeout",
                                                         "by the fogged window"]),
    (["Sherlock", "Jeff Hope"], "Roland-Kerr College", "Indoor",
     ["studies", "plays the game with", "picks up", "refuses", "questions"],
     ["the two identical pill bottles", "the cabbie Jeff Hope", "the glass of water", "the gun lighter",
      "the sponsor called Moriarty"], ["in the empty classroom", "under fluorescent lights", "across the desk"]),
]
CAMERA = ["Close-up", "Medium", "Wide", "Over-the-shoulder", "Insert"]


def sherlock_table(seed=0, n_repeats=6):
    """A Sherlock-shaped annotation table (the file's own column names) for a FILM-second film, and the positions of
    the rows that are repeated (each copy sits right after its original)."""
    rng = np.random.default_rng(seed)
    rows, seen, t, seg = [], set(), 0.0, 0
    while t < FILM:
        chars, location, space, actions, objects, settings = SCENES[(seg // 7) % len(SCENES)]
        for k in range(7):  # seven segments per scene
            if t >= FILM:
                break
            seg += 1
            dur = 0.0 if seg == 20 else float(np.round(rng.uniform(1.0, 6.0), 1))  # one zero-length segment
            who = list(rng.choice(chars, size=rng.integers(1, len(chars) + 1), replace=False))
            detail = None
            while detail is None or detail in seen:  # annotators describe every segment afresh
                detail = (f"{who[0]} {rng.choice(actions)} {rng.choice(objects)} {rng.choice(settings)}"
                          + (f", then {rng.choice(actions)} {rng.choice(objects)}" if rng.random() < 0.5 else ""))
            seen.add(detail)
            rows.append({
                "Segment Number": seg,
                "Start Time (s) ": t, "End Time (s) ": t + dur,
                "Start Time (TRs, 1.5s)": int(t // TR) + 1, "End Time (TRs, 1.5s)": int((t + dur) // TR) + 1,
                "Scene Segments": f"{seg // 7 + 1}. {location}" if k == 0 else None,
                "Scene Details - A Level ": detail,
                "Space-In/Outdoor": space,
                "Name - All": ", ".join(who) if rng.random() > 0.1 else None,  # some segments show nobody named
                "Name - Focus": who[0], "Name - Speaking": who[-1] if rng.random() < 0.6 else None,
                "Location": location, "Camera Angle": rng.choice(CAMERA),
                "Music Presence ": rng.choice(["Yes", "No"]), "Words on Screen ": None,
            })
            gap = float(np.round(rng.uniform(2.0, 8.0), 1)) if rng.random() < 0.15 else 0.0  # unannotated stretches
            t += dur + gap
    rows[-1]["End Time (s) "] = FILM + 4.0  # the last segment runs past the film's end
    table = pd.DataFrame(rows)
    dups = sorted(rng.choice(np.arange(1, len(table) - 1), size=n_repeats, replace=False))
    order = sorted(list(range(len(table))) + dups)
    return table.iloc[order].reset_index(drop=True), dups


@pytest.fixture(scope="module")
def sherlock(tmp_path_factory):
    table, dups = sherlock_table()
    path = tmp_path_factory.mktemp("ann") / "annotations.xlsx"
    table.to_excel(path, index=False)
    return path, table, dups


def overlap_reference(df, n_trs, tr, start=0.0):
    "Brute force: per TR, texts of segments with s < hi and e > lo (zero-length: lo <= s < hi), time order, once."
    out = []
    for i in range(n_trs):
        lo, hi = start + i * tr, start + (i + 1) * tr
        parts = []
        for s, e, text in df.sort_values(["start", "end"], kind="stable")[["start", "end", "text"]].itertuples(index=False):
            hit = (s < hi and e > lo) if e > s else (lo <= s < hi)
            if hit and text and text not in parts:
                parts.append(text)
        out.append(parts)
    return out


# --- load_annotations ---------------------------------------------------------------------------------------

def test_sherlock_table_reads(sherlock, caplog):
    path, table, dups = sherlock
    assert SHERLOCK_TIME_COLUMNS[0] in table.columns and "Scene Details - A Level " in table.columns
    with caplog.at_level(logging.INFO, logger="giblet.data.text"):
        df = load_annotations(path)
    assert f"dropped {len(dups)} exact duplicate rows" in caplog.text
    assert list(df.columns[:3]) == ["start", "end", "text"]
    assert len(df) == len(table) - len(dups)
    assert df["start"].dtype == float and df["end"].dtype == float
    assert df["start"].is_monotonic_increasing
    assert "Camera Angle" in df.columns and "Segment Number" in df.columns  # the file's own columns ride along
    # the index is the row number in the spreadsheet (header = row 1)
    first = df.iloc[0]
    assert df.index[0] == 2 and first["Segment Number"] == table.loc[0, "Segment Number"]
    # text: the three Sherlock columns joined with "; ", blank cells skipped
    for row, rec in df.iterrows():
        src = table.loc[row - 2]
        parts = [src["Scene Details - A Level "], src["Name - All"], src["Location"]]
        assert rec["text"] == "; ".join(p for p in parts if isinstance(p, str)), row
    assert any(t.count("; ") == 1 for t in df["text"])  # rows without names


def test_duplicate_rows_dropped_are_the_repeats(sherlock):
    path, table, dups = sherlock
    df = load_annotations(path)
    repeats = {d + 1 + i + 2 for i, d in enumerate(dups)}  # spreadsheet rows of the second copies
    assert not (repeats & set(df.index))
    assert df["Segment Number"].is_unique


def test_other_spellings_and_formats(tmp_path, sherlock):
    _, table, _ = sherlock
    ref = load_annotations(sherlock[0])[["start", "end", "text"]]
    csv = table.rename(columns={"Start Time (s) ": "  start time (S)", "End Time (s) ": "END TIME (s)",
                                "Location": " location "})
    csv.to_csv(tmp_path / "a.csv", index=False)
    got = load_annotations(tmp_path / "a.csv")[["start", "end", "text"]]
    pd.testing.assert_frame_equal(got, ref)
    bids = pd.DataFrame({"onset": ref["start"].values, "duration": (ref["end"] - ref["start"]).values,
                         "trial_type": ["x"] * len(ref), "text": ref["text"].values})
    bids.to_csv(tmp_path / "events.tsv", sep="\t", index=False)
    got = load_annotations(tmp_path / "events.tsv")
    np.testing.assert_allclose(got["end"].values, ref["end"].values)
    assert got["text"].tolist() == ref["text"].tolist()
    only = load_annotations(tmp_path / "events.tsv", text_columns=["TRIAL_TYPE"], start_column="onset")
    assert set(only["text"]) == {"x"}


def test_film_end_clips_with_warning_or_raises(sherlock, caplog):
    path, table, _ = sherlock
    last_row = len(table) + 1
    with caplog.at_level(logging.WARNING, logger="giblet.data.text"):
        df = load_annotations(path, film_duration=FILM)
    assert "end after the film's end" in caplog.text and f"rows {last_row}" in caplog.text
    assert df["end"].max() == FILM
    with pytest.raises(ValueError, match=rf"annotations.xlsx.*rows {last_row}"):
        load_annotations(path, film_duration=FILM, past_end="raise")
    short = load_annotations(path, film_duration=100.0)  # segments starting after the end are removed
    assert df.shape[0] > short.shape[0] and short["start"].max() < 100.0 and short["end"].max() == 100.0


# --- bad inputs ---------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.xlsx"):
        load_annotations(tmp_path / "nothere.xlsx")


@pytest.mark.parametrize("name", ["ann.json", "ann.xls", "ann"])
def test_unsupported_extension(tmp_path, name):
    (tmp_path / name).write_text("{}")
    with pytest.raises(ValueError, match=r"unsupported annotation file type.*\.xlsx, \.xlsm, \.csv, \.tsv"):
        load_annotations(tmp_path / name)


def test_header_only(tmp_path):
    (tmp_path / "empty.csv").write_text("Start Time (s) ,End Time (s) ,Location\n,,\n")
    with pytest.raises(ValueError, match="empty.csv: no annotated segments"):
        load_annotations(tmp_path / "empty.csv")


def test_unreadable_file(tmp_path):
    (tmp_path / "broken.xlsx").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="broken.xlsx: could not be read"):
        load_annotations(tmp_path / "broken.xlsx")


@pytest.mark.parametrize("drop,what", [("Start Time (s) ", "start-time"), ("End Time (s) ", "end-time")])
def test_missing_time_columns(tmp_path, sherlock, drop, what):
    sherlock[1].drop(columns=[drop]).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=f"t.csv: no {what} column") as err:
        load_annotations(tmp_path / "t.csv")
    assert "columns found: ['Segment Number'" in str(err.value) and "'Location'" in str(err.value)
    with pytest.raises(ValueError, match="looked for 'Begin'"):
        load_annotations(tmp_path / "t.csv", start_column="Begin", end_column="Finish")


def test_nan_and_reversed_times_list_rows(tmp_path, sherlock):
    table = sherlock[1].copy()
    table.loc[3, "Start Time (s) "] = np.nan      # spreadsheet row 5
    table["End Time (s) "] = table["End Time (s) "].astype(object)
    table.loc[10, "End Time (s) "] = "soon"       # row 12: not a number
    table.loc[20, "End Time (s) "] = table.loc[20, "Start Time (s) "] - 1.0  # row 22: reversed
    table.loc[30, "Start Time (s) "] = -2.0       # row 32: negative
    table.to_excel(tmp_path / "bad.xlsx", index=False)
    with pytest.raises(ValueError) as err:
        load_annotations(tmp_path / "bad.xlsx")
    msg = str(err.value)
    assert "bad.xlsx" in msg
    assert "missing or non-numeric time in rows 5, 12" in msg
    assert "end before start in rows 22" in msg
    assert "negative or infinite time in rows 32" in msg


def test_no_text_columns(tmp_path, sherlock):
    table = sherlock[1].drop(columns=list(SHERLOCK_TEXT_COLUMNS[1:]) + ["Scene Details - A Level "])
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"t.csv: no text columns: expected.*columns found: \['Segment Number'"):
        load_annotations(tmp_path / "t.csv")
    with pytest.raises(ValueError, match=r"no text columns named \['Mood'\]"):
        load_annotations(sherlock[0], text_columns=["Location", "Mood"])
    with pytest.raises(ValueError, match="text_columns is empty"):
        load_annotations(sherlock[0], text_columns=[])


def test_partial_default_text_columns_warn(tmp_path, sherlock, caplog):
    sherlock[1].drop(columns=["Name - All"]).to_csv(tmp_path / "t.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="giblet.data.text"):
        df = load_annotations(tmp_path / "t.csv")
    assert "only" in caplog.text and "Name - All" in caplog.text
    assert all(t.count("; ") == 1 for t in df["text"])


def test_ambiguous_columns(tmp_path, sherlock):
    table = sherlock[1].copy()
    table["LOCATION "] = table["Location"]
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match="2 columns match the text column 'Location'"):
        load_annotations(tmp_path / "t.csv")


# --- annotations_to_trs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("start", [0.0, 7.3])
def test_trs_match_brute_force(sherlock, start):
    df = load_annotations(sherlock[0], film_duration=FILM)
    texts, has_text = annotations_to_trs(df, N_TRS, TR, start=start)
    ref = overlap_reference(df, N_TRS, TR, start)
    assert len(texts) == N_TRS and has_text.dtype == bool and has_text.shape == (N_TRS,)
    assert texts == [" | ".join(p) for p in ref]
    assert has_text.tolist() == [bool(p) for p in ref]
    assert 0 < (~has_text).sum() < N_TRS // 4  # the gaps show, most TRs have text
    assert any(" | " in t for t in texts)      # segments sharing a TR are all kept


def test_tr_boundaries():
    df = pd.DataFrame({"start": [0.0, 3.0, 4.5, 6.0], "end": [3.0, 3.0, 6.0, 9.0], "text": ["a", "b", "c", "a"]})
    texts, has_text = annotations_to_trs(df, 7, 1.5)
    # [0,1.5) [1.5,3) [3,4.5) [4.5,6) [6,7.5) [7.5,9) [9,10.5)
    assert texts == ["a", "a", "b", "c", "a", "a", ""]
    assert has_text.tolist() == [True] * 6 + [False]
    texts, _ = annotations_to_trs(df.assign(end=[3.0, 3.0, 6.5, 9.0]), 5, 1.5)
    assert texts[4] == "c | a"
    with pytest.raises(ValueError, match="missing"):
        annotations_to_trs(df.drop(columns="text"), 5, 1.5)
    with pytest.raises(ValueError, match="tr must be positive"):
        annotations_to_trs(df, 5, 0)


# --- embedders ----------------------------------------------------------------------------------------------

TOPICS = {
    "crime scene": ["Sherlock kneels over the dead woman in pink at Lauriston Gardens",
                    "Lestrade shows Sherlock the dead woman in the pink coat",
                    "Anderson photographs the dead woman and the word Rache on the floor",
                    "Sherlock deduces the dead woman was married from her wedding ring"],
    "chase": ["Sherlock and John chase the taxi through the night streets of Soho",
              "John runs across the rooftops chasing the taxi",
              "The taxi stops and Sherlock runs to the passenger door",
              "Sherlock and John sprint down a narrow alley after the taxi"],
    "therapy": ["John talks with his therapist Ella about his blog",
                "Ella asks John whether he has written in his blog",
                "John sits silently as his therapist takes notes",
                "The therapist tells John his limp is psychosomatic"],
}


@pytest.mark.parametrize("kw", [{}, {"char_ngrams": (3, 5)}, {"dim": 256, "char_ngrams": (3, 5)}])
def test_hashing_embedder_separates_topics(kw):
    emb = HashingEmbedder(**kw)
    sents = [s for ss in TOPICS.values() for s in ss]
    topic = np.repeat(np.arange(len(TOPICS)), 4)
    E = emb(sents)
    assert E.dtype == np.float32 and E.shape == (len(sents), emb.dim)
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1.0, atol=1e-5)
    S = E @ E.T
    same = topic[:, None] == topic[None, :]
    off = ~np.eye(len(sents), dtype=bool)
    within, across = S[same & off], S[~same]
    auc = (within[:, None] > across[None, :]).mean()  # chance that a same-topic pair beats a cross-topic pair
    assert within.mean() > 3 * across.mean() and auc > 0.85, (within.mean(), across.mean(), auc)
    np.fill_diagonal(S, -np.inf)
    assert (topic[S.argmax(axis=1)] == topic).all()  # every sentence's nearest other is from its own topic


def test_hashing_embedder_is_stable_across_processes():
    code = ("from giblet.data.embeddings import HashingEmbedder; import hashlib;"
            "print(hashlib.sha256(HashingEmbedder(dim=64)(['Sherlock at 221B Baker Street']).tobytes()).hexdigest())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed,
                                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}).stdout for seed in ("1", "2")}
    assert len(runs) == 1


def test_hashing_embedder_edges():
    emb = HashingEmbedder(dim=32)
    assert emb([]).shape == (0, 32)
    assert not emb(["", "?!"]).any()  # no words: an all-zero row
    assert emb(["The and of"]).any()  # only stop words: they are used after all
    np.testing.assert_array_equal(emb("Baker Street"), emb(["baker STREET"]))
    with pytest.raises(ValueError, match="dim"):
        HashingEmbedder(dim=1)


def test_sentence_transformer_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'giblet\[text\]'") as err:
        SentenceTransformerEmbedder("all-MiniLM-L6-v2")
    assert "SentenceTransformerEmbedder('/models/" in str(err.value)


class _FakeModel:
    def __init__(self, name, device=None, **kw):
        if name != "/models/tiny":
            raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}")
        self.kw = kw

    def get_sentence_embedding_dimension(self):
        return 8

    def encode(self, texts, batch_size, convert_to_numpy, normalize_embeddings, show_progress_bar):
        out = np.stack([HashingEmbedder(dim=8)([t])[0] for t in texts]).astype(np.float64)
        return out


def test_sentence_transformer_offline_and_plugged_in(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", types.SimpleNamespace(SentenceTransformer=_FakeModel))
    with pytest.raises(FileNotFoundError, match="'all-MiniLM-L6-v2' is not available") as err:
        SentenceTransformerEmbedder("all-MiniLM-L6-v2")
    assert "pass its path" in str(err.value) and "giblet[text]" in str(err.value)
    emb = SentenceTransformerEmbedder("/models/tiny", local_files_only=True)
    assert emb.dim == 8 and emb.model.kw == {"local_files_only": True}
    E = embed_trs(["a b", "", "c d"], [True, False, True], emb)
    assert E.dtype == np.float32 and E.shape == (3, 8) and not E[1].any()


# --- embed_trs and nearest_text -----------------------------------------------------------------------------

def test_embed_trs_embeds_each_text_once(sherlock):
    df = load_annotations(sherlock[0], film_duration=FILM)
    texts, has_text = annotations_to_trs(df, N_TRS, TR)
    calls = []
    emb = HashingEmbedder(dim=256)
    E = embed_trs(texts, has_text, lambda ts: calls.append(len(ts)) or emb(ts))
    assert calls == [len(set(t for t, h in zip(texts, has_text) if h))]
    assert E.shape == (N_TRS, 256) and E.dtype == np.float32
    assert not E[~has_text].any()
    np.testing.assert_allclose(np.linalg.norm(E[has_text], axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(E, embed_trs(texts, has_text, HashingEmbedder(dim=256)))
    assert embed_trs(["", ""], [False, False], emb).shape == (2, 256)
    with pytest.raises(ValueError, match="marked has_text but their text is empty"):
        embed_trs(["a", ""], [True, True], emb)
    with pytest.raises(ValueError, match="embedder returned shape"):
        embed_trs(["a", "b"], [True, True], lambda ts: np.zeros(3))


def recovery(df, sigma, dim=1024, seed=0):
    "Top-1 recovery of TR texts (bank: every distinct TR text) from embeddings plus noise of norm ~sigma."
    texts, has_text = annotations_to_trs(df, N_TRS, TR)
    emb = HashingEmbedder(dim=dim)
    E = embed_trs(texts, has_text, emb)[has_text]
    truth = [t for t, h in zip(texts, has_text) if h]
    bank = sorted(set(truth))
    rng = np.random.default_rng(seed)
    noisy = E + sigma / np.sqrt(dim) * rng.standard_normal(E.shape).astype(np.float32)
    got = nearest_text(noisy, bank, bank_embeddings=emb(bank))
    return float(np.mean([g == t for g, t in zip(got, truth)])), len(truth), len(bank)


def test_nearest_text_recovers_tr_text(sherlock):
    df = load_annotations(sherlock[0], film_duration=FILM)
    clean, n, n_bank = recovery(df, 0.0)
    assert clean == 1.0 and n > 250 and n_bank > 100
    for sigma in (1.0, 2.0):  # noise norm 1x and 2x the signal's: cosine to the clean vector ~0.71 and ~0.45
        noisy, _, _ = recovery(df, sigma)
        assert noisy >= 0.95, (sigma, noisy)


def test_nearest_text_segment_bank(sherlock):
    "With the segment texts as the bank, a TR reads back as one of the segments it overlaps."
    df = load_annotations(sherlock[0], film_duration=FILM)
    texts, has_text = annotations_to_trs(df, N_TRS, TR)
    bank = sorted(set(df["text"]))
    got = nearest_text(embed_trs(texts, has_text), bank)  # default embedder on both sides
    hits = [g in t.split(" | ") for g, t, h in zip(got, texts, has_text) if h]
    assert np.mean(hits) >= 0.95, np.mean(hits)
    assert all(g == "" for g, h in zip(got, has_text) if not h)


def test_nearest_text_inputs():
    torch = pytest.importorskip("torch")
    bank = ["Sherlock plays the violin", "John writes his blog", "Mrs Hudson brings tea"]
    emb = HashingEmbedder(dim=64)
    got, scores = nearest_text(torch.from_numpy(emb(bank[::-1])), bank, embedder=emb, return_scores=True)
    assert got == bank[::-1] and scores.dtype == np.float32 and np.allclose(scores, 1.0, atol=1e-5)
    assert nearest_text(emb(bank[1]), bank, embedder=emb) == [bank[1]]
    with pytest.raises(ValueError, match="expected \\(3, 64\\)"):
        nearest_text(emb(bank), bank, bank_embeddings=np.zeros((3, 32)))
    with pytest.raises(ValueError, match="bank of candidate texts is empty"):
        nearest_text(emb(bank), [])


# --- the real Sherlock spreadsheet (two parts on one sheet) -------------------------------------------------------

SHERLOCK_XLSX = ROOT.parent / "shared" / "data" / "sherlock" / "Sherlock_Segments_1000_NN_2017.xlsx"
PART_TRS = {1: 946, 2: 1030}  # the two runs of the study, TR 1.5 s


@pytest.fixture(scope="module")
def real(request):
    if not SHERLOCK_XLSX.exists():
        print(f"skipping: the real Sherlock spreadsheet is absent ({SHERLOCK_XLSX})")
        pytest.skip(f"the real Sherlock spreadsheet is absent ({SHERLOCK_XLSX})")
    logger = logging.getLogger("giblet.data.text")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        df = load_annotations(SHERLOCK_XLSX)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return df, [r.getMessage() for r in records]


def test_real_sherlock_parts(real):
    df, msgs = real
    assert df.attrs["n_parts"] == 2
    seg = df["Segment Number"].astype(int)
    assert sorted(seg[df["part"] == 1]) == list(range(1, 483))      # rows 1-482: part 1
    assert sorted(seg[df["part"] == 2]) == list(range(483, 1001))   # rows 483-1000: part 2, clock back at 0
    for p, (lo, hi) in {1: (0.0, 1426.0), 2: (0.0, 1544.0)}.items():
        g = df[df["part"] == p]
        assert (g["start"].min(), g["end"].max()) == (lo, hi)
        assert g["start"].is_monotonic_increasing                  # time order within the part
    assert len(scene_starts(df)) == 50                              # 50 named scenes, ' ' cells are blank
    assert scene_starts(df).iloc[0].tolist() == [1, 0.0, "1. Cartoon"]
    assert any("2 parts, rows 2-483, 484-1001" in m for m in msgs), msgs
    assert any("28 cells hold only spaces" in m for m in msgs), msgs
    assert any("1 zero-length segments (rows 14)" in m for m in msgs), msgs
    assert any("2 rows have no value in 'Start Time (TRs, 1.5s)' (rows 482, 483)" in m for m in msgs), msgs


def test_real_sherlock_tr_column_agrees_with_seconds(real):
    df, _ = real
    trs = pd.to_numeric(df["Start Time (TRs, 1.5s)"])
    assert trs.isna().sum() == 2
    for p, first_tr in {1: 1, 2: 947}.items():                     # the TR column runs on across the restart
        g = df[(df["part"] == p) & trs.notna()]
        lag = (trs[g.index] - first_tr) * 1.5 - g["start"]
        assert lag.abs().max() <= 1.5, (p, lag.abs().max())


def test_real_sherlock_text_stays_in_its_part(real):
    df, _ = real
    # rows 197-198 (part 1) and 688 (part 2) both cover 621-622.5 s of their own part's clock: TR 414
    texts = {p: annotations_to_trs(df, n, 1.5, part=p)[0] for p, n in PART_TRS.items()}
    assert texts[1][414] == ("Sherlock doesn't answer and peers down at his sample once again; Sherlock; "
                             "St. Bartholomew's Hospital Laboratory | John says: \"Umm here\" Sherlock turns his head toward "
                             "John. John says: \"Use mine.\"; Sherlock, John; St. Bartholomew's Hospital Laboratory")
    assert texts[2][414] == ("John turns to where the sound is coming from. It is from a public telephone in a red booth. "
                             "He looks at it for a few seconds.; John; Lauriston Gardens - Street")
    for p in PART_TRS:                                              # every TR's text comes from its own part only
        own = set(df.loc[df["part"] == p, "text"])
        assert all(t in own for tr_text in texts[p] if tr_text for t in tr_text.split(" | "))
    with pytest.raises(ValueError, match="name the part"):
        annotations_to_trs(df, 10, 1.5)
    only2 = load_annotations(SHERLOCK_XLSX, part=2)
    assert annotations_to_trs(only2, PART_TRS[2], 1.5)[0] == texts[2]
