"""Faults, round two (issue 22): each case a new user met, as a cheap test. Wrong subjects (a broken link, one subject
written twice), a spec that repeats a key, empty and unexpanded paths, giblet's cleaning of temporary files that are not
its own, lesion runs that share a folder or were killed, option pairs and run folders that cannot work, exit codes, and
messages that name the file and the fix."""
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import giblet.io as gio
from giblet import cli, run
from giblet.dataset import default_cache_dir
from giblet.io import DiskFullError
from giblet.study import SpecError, discover, read_spec, resolve_study


def _flat_study(root:Path, subjects=("s1.nii.gz", "s2.nii.gz"))->Path:
    "A study folder that `discover` accepts: film, annotations and NIfTIs (names only; nothing here is read)."
    root.mkdir(parents=True, exist_ok=True)
    (root / "film.m4v").write_bytes(b"x"); (root / "ann.csv").write_text("a\n")
    for s in subjects: (root / s).write_bytes(b"x")
    return root


def _python(code:str)->subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)


# --- wrong subjects ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["sherlock_nii", "."])
def test_a_broken_nifti_link_is_an_error_naming_link_and_target(tmp_path, where):
    "An unfetched DataLad file is a symlink to nothing: it used to drop out of the study without a word."
    root = _flat_study(tmp_path / "study", ())
    d = root / where; d.mkdir(exist_ok=True)
    (d / "s1.nii.gz").write_bytes(b"x")
    target = tmp_path / "annex" / "objects" / "MD5E-s123--abc.nii.gz"
    os.symlink(target, d / "s2.nii.gz")
    for find in (discover, resolve_study):
        with pytest.raises(FileNotFoundError) as e: find(root)
        msg = str(e.value)
        assert "s2.nii.gz" in msg and str(target) in msg and "broken" in msg, msg


def test_one_subject_as_nii_and_nii_gz_is_refused(tmp_path):
    "Two files of one subject counted as two subjects; subject 1 then weighed twice."
    root = _flat_study(tmp_path / "study", ("s1.nii", "s1.nii.gz", "s2.nii.gz"))
    for find in (discover, resolve_study):
        with pytest.raises(ValueError) as e: find(root)
        msg = str(e.value)
        assert str(root / "s1.nii") in msg and str(root / "s1.nii.gz") in msg, msg
    (root / "s1.nii").unlink()
    assert [p.name for p in discover(root).nii] == ["s1.nii.gz", "s2.nii.gz"]


def test_a_spec_that_repeats_a_key_is_refused_with_the_line(tmp_path):
    "YAML lets the last of two equal keys win: `s1` then pointed at s2's scan."
    spec = tmp_path / "study.yaml"
    spec.write_text(textwrap.dedent("""\
        film: film.m4v
        annotations: ann.csv
        runs:
          - name: run-1
            nii:
              s1: s1.nii.gz
              s1: s2.nii.gz
        """))
    with pytest.raises(SpecError) as e: read_spec(spec)
    msg = str(e.value)
    assert str(spec) in msg and "duplicate key" in msg and "'s1'" in msg and "line 7" in msg, msg
    spec.write_text(spec.read_text().replace("      s1: s2", "      s2: s2"))
    assert sorted(read_spec(spec).runs[0].nii) == ["s1", "s2"]


# --- paths ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script,argv", [(cli.giblet_train, ["--out", ""]), (cli.giblet_train, ["--data-dir", "", "--out", "o"]),
                                         (cli.giblet_lesion, ["ck.pt", "--out", ""]), (cli.giblet_synth, ["--out", ""])])
def test_an_empty_path_is_refused(tmp_path, monkeypatch, capsys, script, argv):
    "`--out $UNSET` used to write the whole run into the current folder."
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e: script(argv)
    err = capsys.readouterr().err
    name = "--data-dir" if "--data-dir" in argv else "--out"
    assert e.value.code == 2 and f"{name} is empty" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_giblet_cache_expands_home_and_variables_and_is_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home")); monkeypatch.setenv("WHERE", "gc")
    monkeypatch.setenv("GIBLET_CACHE", "~/gcache")
    assert default_cache_dir() == tmp_path / "home" / "gcache"
    monkeypatch.setenv("GIBLET_CACHE", "$HOME/${WHERE}")
    assert default_cache_dir() == tmp_path / "home" / "gc"
    monkeypatch.chdir(tmp_path); monkeypatch.setenv("GIBLET_CACHE", "rel/cache")
    assert default_cache_dir() == tmp_path / "rel" / "cache"
    monkeypatch.setenv("GIBLET_CACHE", "$NO_SUCH_VARIABLE_HERE/c")
    with pytest.raises(ValueError, match="GIBLET_CACHE"): default_cache_dir()


def test_a_relative_giblet_cache_is_recorded_absolute(tmp_path, monkeypatch):
    "Resuming from another folder used to build a second cache there."
    monkeypatch.chdir(tmp_path); monkeypatch.setenv("GIBLET_CACHE", "gcache")
    cfg = cli.train_config(out=str(tmp_path / "run"))
    assert cfg.data.cache_dir == str(tmp_path / "gcache")
    assert cli.train_config(out=str(tmp_path / "run"), cache_dir="other").data.cache_dir == str(tmp_path / "other")


# --- giblet cleans only its own temporaries ---------------------------------------------------------------------------

def test_cleaning_removes_only_giblets_own_temporaries(tmp_path):
    "Other programs' hidden `.NAME.xxxxxxxx.tmp` files beside a lesion --out or in a shared cache used to go too."
    child = _python(f"""
        import time
        from giblet.io import atomic_write
        def slow(f): f.write(b"x"); print("writing", flush=True); time.sleep(60)
        atomic_write({str(tmp_path / 'mine.bin')!r}, slow)
    """)
    assert child.stdout.readline().strip() == "writing"
    child.kill(); child.wait(); child.stdout.close()
    (mine,) = [p for p in tmp_path.iterdir()]
    assert "giblet" in mine.name
    dead = subprocess.Popen([sys.executable, "-c", "pass"]); dead.wait()
    others = [tmp_path / ".notes.txt.k2j_x9q1.tmp", tmp_path / f".report.{dead.pid}-{gio.host_tag()}abcd.tmp",
              tmp_path / ".swap.part", tmp_path / f".{'1' * 20}.k2j_x9q1"]
    for p in others[:3]: p.write_text("someone else's"); os.utime(p, (0, 0))
    others[3].mkdir(); os.utime(others[3], (0, 0))
    assert gio.clean_leftovers(tmp_path) == [mine]
    assert sorted(tmp_path.iterdir()) == sorted(others)


# --- lesion runs ------------------------------------------------------------------------------------------------------

def test_two_lesion_runs_into_one_new_folder_the_second_is_refused(tmp_path, monkeypatch):
    "Both used to exit 0, and one run's results were gone."
    from giblet import lesion_run
    inside, go = threading.Event(), threading.Event()
    def slow_load(*a, **k): inside.set(); go.wait(30); raise FileNotFoundError("stop here")
    monkeypatch.setattr(lesion_run, "load_run", slow_load)
    out = tmp_path / "lesions"
    first = threading.Thread(target=lambda: pytest.raises(FileNotFoundError, lesion_run.lesion_main, "ck.pt", str(out)))
    first.start()
    try:
        assert inside.wait(30)
        with pytest.raises(gio.FolderLockedError, match="in use by process"): lesion_run.lesion_main("ck.pt", str(out))
    finally: go.set(); first.join()
    with pytest.raises(FileNotFoundError, match="stop here"): lesion_run.lesion_main("ck.pt", str(out))   # free again
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_a_killed_lesions_partial_folder_goes_on_the_next_run(tmp_path, monkeypatch):
    "A kill -9 while the run folder was written left a hidden partial folder beside --out for good."
    from giblet import lesion_run
    out = tmp_path / "lesions"
    child = _python(f"""
        import time
        from giblet.io import atomic_folder
        with atomic_folder({str(out)!r}) as tmp:
            (tmp / "effects.png").write_bytes(b"x" * 1000); print("writing", flush=True); time.sleep(60)
    """)
    assert child.stdout.readline().strip() == "writing"
    child.kill(); child.wait(); child.stdout.close()
    (partial,) = tmp_path.iterdir()
    other = tmp_path / ".other.k2j_x9q1.tmp"; other.write_text("not giblet's")
    def no_run(*a, **k): raise FileNotFoundError("no checkpoint")
    monkeypatch.setattr(lesion_run, "load_run", no_run)
    with pytest.raises(FileNotFoundError): lesion_run.lesion_main("ck.pt", str(out))
    assert not partial.exists() and other.exists() and not out.exists()


# --- option pairs and run folders that cannot work; exit codes --------------------------------------------------------

def _exit(script, argv, capsys)->tuple:
    "(exit code, stderr) of a console script run in this process."
    with pytest.raises(SystemExit) as e: script(argv)
    return e.value.code, capsys.readouterr().err


def test_data_dir_with_study_is_refused(tmp_path, capsys):
    "--data-dir used to be ignored without a word when --study was given."
    a, b = _flat_study(tmp_path / "a"), _flat_study(tmp_path / "b")
    for script in (cli.giblet_train, cli.giblet_cache):
        code, err = _exit(script, ["--data-dir", str(a), "--study", str(b), "--cache-dir", str(tmp_path / "c")]
                          + (["--out", str(tmp_path / "o")] if script is cli.giblet_train else []), capsys)
        assert code == 2 and "--data-dir" in err and "--study" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("option", ["--data-dir", "--study"])
def test_out_inside_the_study_folder_is_refused(tmp_path, capsys, option):
    "Its NIfTIs (test_pred.nii.gz, ...) would become subjects of the study for every later run."
    root = _flat_study(tmp_path / "study")
    code, err = _exit(cli.giblet_train, [option, str(root), "--out", str(root / "runs" / "a")], capsys)
    assert code == 2 and "inside the study folder" in err and str(root) in err, err
    assert sorted(p.name for p in root.iterdir()) == ["ann.csv", "film.m4v", "s1.nii.gz", "s2.nii.gz"]


def test_test_frac_0_is_refused_before_training(tmp_path, capsys, monkeypatch):
    "It used to be refused only when the report was written, after the whole training."
    for stage in ("run_study", "run_folds"):   # the run's plan is refused before either trains anything
        monkeypatch.setattr(run, stage, lambda *a, **k: pytest.fail("trained"))
    code, err = _exit(cli.giblet_train, ["--out", str(tmp_path / "o"), "--set", "test_frac=0"], capsys)
    assert code == 2 and "test_frac" in err and "--n-folds" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("errno_", ["EROFS", "EACCES"])
def test_a_read_only_folder_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, errno_):
    "An unwritable --out or GIBLET_CACHE gave `OSError: [Errno 30]` with a traceback."
    import errno
    ro = tmp_path / "ro"
    def unwritable(cfg, out, **k): raise OSError(getattr(errno, errno_), os.strerror(getattr(errno, errno_)), str(ro / "run" / ".lock"))
    monkeypatch.setattr(cli, "run_training", unwritable)
    code, err = _exit(cli.giblet_train, ["--out", str(ro / "run")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(ro / "run") in err, err
    assert os.strerror(getattr(errno, errno_)) in err and "--out" in err, err
    monkeypatch.setattr(cli, "run_training", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError): cli.giblet_train(["--out", str(ro / "run")])          # not a user error: the traceback stays


def test_ctrl_c_is_exit_130_with_how_to_resume(tmp_path, capsys, monkeypatch):
    "Ctrl-C printed a traceback, though --resume then finished the run exactly."
    out = tmp_path / "run"
    def interrupted(cfg, out_dir, **k):
        ck = Path(out_dir) / "checkpoints"; ck.mkdir(parents=True); (ck / "last.pt").write_bytes(b"x")
        (Path(out_dir) / "log.csv").write_text("epoch,train_total\n1,0.5\n2,0.4\n")
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "run_training", interrupted)
    code, err = _exit(cli.giblet_train, ["--out", str(out)], capsys)
    assert code == 130 and err.strip() == f"giblet-train: interrupted at epoch 3; resume with giblet-train --resume --out {out}", err
    monkeypatch.setattr(cli, "run_training", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    code, err = _exit(cli.giblet_train, ["--out", str(tmp_path / "new")], capsys)
    assert code == 130 and "interrupted before the first checkpoint" in err and "Traceback" not in err, err


# --- messages that name the file and the fix ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["/nonexistent/models/clip", "./models/clip", "~/models/clip", "models/deep/clip"])
def test_a_missing_local_model_folder_says_no_such_folder(name, monkeypatch):
    "It got Hugging Face's 'Repo id must be in the form ...'."
    import transformers
    from giblet.features import _from_pretrained, _model_identity
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for f in (lambda: _model_identity(name), lambda: _from_pretrained(transformers.AutoModel, name, "model")):
        with pytest.raises(FileNotFoundError) as e: f()
        assert str(e.value).startswith(f"{name}: no such folder"), e.value


def test_giblet_synth_advises_its_own_flag(tmp_path, capsys, monkeypatch):
    "It advised `overwrite=True`, which a command line cannot take."
    from giblet import synthetic
    def exists(root, **k): raise FileExistsError(f"{root}: already holds a dataset (truth.npz); pass overwrite=True to replace it")
    monkeypatch.setattr(synthetic, "make_dataset", exists)
    code, err = _exit(cli.giblet_synth, ["--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "--overwrite" in err and "overwrite=True" not in err, err


def test_a_stray_dataset_description_says_which_layout_and_why(tmp_path):
    "It turned a Sherlock folder into 'BIDS', with the message 'tasks []'."
    pytest.importorskip("bids")
    root = _flat_study(tmp_path / "study")
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.8.0"}')
    with pytest.raises(ValueError) as e: resolve_study(root)
    msg = str(e.value)
    assert "read as BIDS because it holds dataset_description.json" in msg and "Sherlock-layout" in msg, msg


# --- every stream of a TR from the same film time ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_part_study(tmp_path_factory):
    "A synthetic study of two runs whose annotation table restarts its clock for run 2 (two parts)."
    from giblet.synthetic import make_dataset
    return make_dataset(tmp_path_factory.mktemp("parts") / "study", n_subjects=1, n_trs=160, n_runs=2, seed=3,
                        shape=(8, 10, 8), size=(32, 18))


def _annotation_parts(path)->list:
    "The rows of each part of a synthetic annotation table (the seconds restart at part 2), read with pandas alone."
    import numpy as np, pandas as pd
    raw = pd.read_excel(path)
    cut = [0, *(np.flatnonzero(np.diff(raw["Start Time (s) "].to_numpy()) < 0) + 1), len(raw)]
    return [raw.iloc[a:b] for a, b in zip(cut[:-1], cut[1:])]


@pytest.mark.parametrize("case", ["one part", "part 1 of 2", "part 2 of 2"])
def test_a_film_start_moves_the_text_with_the_frames(two_part_study, tmp_path, case):
    "`film_start: 39` with `scan_offset: 23` moved the frames, but each TR's annotation text came from 39 s away."
    import numpy as np, yaml
    from giblet.alignment.sync import FeatureParams, plan_run, run_text
    from giblet.study_plan import run_spec
    lay = two_part_study
    parts, ann = _annotation_parts(lay.annotations), lay.annotations
    r1, r2 = lay.runs
    if case == "one part": ann = tmp_path / "part1.csv"; parts[0].to_csv(ann, index=False)
    if case != "part 2 of 2":   # skip a 39 s opening: the scan began 23 volumes before the segment
        run, rows, origin = dict(film_start=39.0, film_stop=r1["film_stop"], scan_offset=23, part=1, nii={"s1": str(r1["nii"][0])}), parts[0], 0.0
    else:                       # skip 9 s of run 2's segment; its part's clock reads 0 where the part starts (`part_start`)
        run, rows, origin = dict(film_start=r2["film_start"] + 9, scan_offset=0, part=2, part_start=r2["film_start"],
                                 nii={"s1": str(r2["nii"][0])}), parts[1], r2["film_start"]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(dict(tr=1.5, film=str(lay.film), annotations=str(ann), runs=[run])))
    spec = read_spec(tmp_path / "study.yaml")
    (run,) = spec.runs
    plan = plan_run(spec.film_of(run), spec.annotations_of(run), run_spec(spec, run, 1.5))
    g = plan.grid
    assert g.film_time == run.film_start + (g.first_volume - run.scan_offset) * 1.5
    film_time = g.film_time + np.arange(g.n_trs) * 1.5           # where each TR's frames and sound are read (`run_video`)
    _, has_text, texts = run_text(plan, FeatureParams(text_dim=16))
    start, end = rows["Start Time (s) "].to_numpy(), rows["End Time (s) "].to_numpy()
    for t, text in zip(film_time - origin, texts):               # the part's own clock at each TR
        want = set(rows["Scene Details - A Level "][(start < t + 1.5) & (end > t)])
        assert all(w in text for w in want) and bool(want) == bool(text), (t, want, text)
    assert has_text.sum() > 30


# --- a study too short for the report ----------------------------------------------------------------------------------

def test_run_training_refuses_test_frac_0_before_reading_the_study(tmp_path, monkeypatch):
    "Only the command line refused it; `run_training` from Python trained fully and then had no test block to report."
    from giblet.training.config import TrainConfig
    monkeypatch.setattr(run, "prepare_data", lambda *a, **k: pytest.fail("read the study"))
    with pytest.raises(ValueError, match="test_frac=0 leaves no test block"): run.run_training(TrainConfig.make(test_frac=0.0), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_check_study_size_says_the_smallest_study(capsys):
    from giblet.training.config import TrainConfig
    cfg = TrainConfig()
    run.check_study_size(400, 1.5, cfg)                                   # long enough: nothing said
    with pytest.raises(ValueError) as e: run.check_study_size(120, 1.5, cfg)
    msg = str(e.value)
    assert "120 TRs (180 s) are too few" in msg and "inner folds" in msg and "--no-baseline" in msg, msg
    need = int(msg.split("has ")[1].split(" TRs")[0])
    run.check_study_size(need, 1.5, cfg)                                 # the size it names works, one TR less does not
    with pytest.raises(ValueError): run.check_study_size(need - 1, 1.5, cfg)
    with pytest.raises(ValueError, match="test TRs are left after the"): run.check_study_size(100, 1.5, cfg, baseline=False)


@pytest.fixture(scope="module")
def short_study(tmp_path_factory):
    "A 120-TR synthetic study (the tiny preset's length): 2 test TRs are left after the gaps."
    from giblet.synthetic import make_dataset
    return make_dataset(tmp_path_factory.mktemp("short") / "study", n_subjects=2, n_trs=120, seed=4, shape=(8, 10, 8), size=(32, 18))


def test_a_short_study_is_refused_before_training_or_reported_without_decoding(short_study, tmp_path, capsys, monkeypatch):
    "A study under about 190 TRs trained fully, then died writing the report (`decode_series: 2 TRs are fewer than the model's window of 16`)."
    from giblet.training.trainer import Trainer
    args = ["--data-dir", str(short_study.root), "--preset", "tiny", "--epochs", "1", "--cache-dir", str(tmp_path / "cache"),
            "--device", "cpu", "--set", "progress=false"]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "fit", lambda self, *a, **k: pytest.fail("trained"))
        code, err = _exit(cli.giblet_train, args + ["--out", str(tmp_path / "a")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "120 TRs" in err and "smallest study" in err, err
    assert not (tmp_path / "a").exists()
    cli.giblet_train(args + ["--out", str(tmp_path / "b"), "--no-baseline"])   # without the baselines a report is written
    report = (tmp_path / "b" / "report.md").read_text()
    assert "Decoding: not scored" in report and "Reconstructions: not drawn" in report, report
    assert (tmp_path / "b" / "metrics.json").is_file() and not (tmp_path / "b" / "figures" / "reconstructions.png").exists()


def _strip_audio(film:Path):
    "Rewrite `film` with its video stream alone (a silent film), its packets copied as they are."
    import av
    tmp = film.with_name("silent_" + film.name)
    with av.open(str(film)) as src, av.open(str(tmp), "w", format="mp4") as dst:
        v = src.streams.video[0]
        out = dst.add_stream_from_template(v)
        for pkt in src.demux(v):
            if pkt.dts is None: continue
            pkt.stream = out; dst.mux(pkt)
    tmp.replace(film)


def test_a_silent_film_trains_without_audio_and_says_so(short_study, tmp_path, capsys, caplog):
    "The advice '--set allow_silence=true' led to 'target_variances: the training audio is constant': no silent film trained."
    import json, shutil
    root = tmp_path / "silent"; shutil.copytree(short_study.root, root); _strip_audio(root / short_study.film.name)
    args = ["--data-dir", str(root), "--preset", "tiny", "--epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
            "--no-baseline", "--set", "progress=false"]
    code, err = _exit(cli.giblet_train, args + ["--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "no audio stream" in err and "--set allow_silence=true" in err, err
    with caplog.at_level(logging.WARNING): cli.giblet_train(args + ["--out", str(tmp_path / "b"), "--set", "allow_silence=true"])
    assert "the film is silent throughout" in caplog.text and "training without audio" in caplog.text
    assert "**Audio**: the film is silent throughout" in (tmp_path / "b" / "report.md").read_text()
    assert "audio" not in json.loads((tmp_path / "b" / "config.json").read_text())["model"]["modalities"]


# --- annotation tables that give no usable text ---------------------------------------------------------------------------

def test_annotation_times_in_milliseconds_are_named(tmp_path):
    "They ended in 'the training text is constant': every segment started past the film's end and was dropped."
    import pandas as pd
    from giblet.data.text import load_annotations
    rows = pd.DataFrame({"onset": [0.0, 30.0, 61.5, 90.0], "offset": [30.0, 61.5, 90.0, 118.0], "text": list("abcd")})
    (tmp_path / "s.csv").write_text(rows.to_csv(index=False))
    rows[["onset", "offset"]] *= 1000; (tmp_path / "ms.csv").write_text(rows.to_csv(index=False))
    assert len(load_annotations(tmp_path / "s.csv", film_duration=120.0)) == 4
    with pytest.raises(ValueError) as e: load_annotations(tmp_path / "ms.csv", film_duration=120.0)
    msg = str(e.value)
    assert str(tmp_path / "ms.csv") in msg and "times look like milliseconds" in msg and "'onset'" in msg, msg
    assert len(load_annotations(tmp_path / "s.csv", film_duration=20.0)) == 1      # a shorter film: cut, not called milliseconds


def test_empty_text_columns_name_the_spreadsheet_and_the_columns(tmp_path):
    "'no training text' said neither which table nor which columns were read."
    import pandas as pd
    from giblet.data.text import load_annotations
    path = tmp_path / "ann.csv"
    pd.DataFrame({"Start Time (s) ": [0.0, 5.0], "End Time (s) ": [5.0, 9.0], "Scene Details - A Level ": [None, " "],
                  "Location": [None, None], "Notes": ["x", "y"]}).to_csv(path, index=False)
    with pytest.raises(ValueError) as e: load_annotations(path)
    msg = str(e.value)
    assert str(path) in msg and "no annotation text" in msg and "'Scene Details - A Level'" in msg and "'Location'" in msg, msg
    assert "text_columns" in msg and load_annotations(path, text_columns=["Notes"])["text"].tolist() == ["x", "y"]


def test_no_training_text_names_the_spreadsheet(short_study, tmp_path):
    "Text only late in the film: the training block had none, and target_variances said only 'no training text'."
    import pandas as pd, shutil
    from giblet.training.config import TrainConfig
    from giblet.training.data import prepare_data
    root = tmp_path / "late"; shutil.copytree(short_study.root, root)
    ann = pd.read_excel(root / "annotations.xlsx")
    ann.loc[ann["Start Time (s) "] < 150, ["Scene Details - A Level ", "Name - All", "Location"]] = None
    ann.to_excel(root / "annotations.xlsx", index=False)
    cfg = TrainConfig.make(data_dir=str(root), preset="tiny", cache_dir=str(tmp_path / "cache"), progress=False, device="cpu")
    with pytest.raises(ValueError) as e: prepare_data(cfg)
    msg = str(e.value)
    assert msg.startswith("no training text") and str(root / "annotations.xlsx") in msg and "text_columns" in msg, msg


# --- films too short to cut -------------------------------------------------------------------------------------------------

def _write_film(path:Path, n_frames:int, fps:int=25):
    "A grey film of `n_frames` frames, 32x18, without sound."
    import av, numpy as np
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps); s.width, s.height, s.pix_fmt = 32, 18, "yuv420p"
        for _ in range(n_frames):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((18, 32, 3), 100, np.uint8), format="rgb24")): c.mux(p)
        for p in s.encode(): c.mux(p)


@pytest.mark.parametrize("frames", [0, 1, 25])
def test_an_empty_or_one_frame_film_is_named(short_study, tmp_path, frames):
    "A 1-frame film said 'the scan (120 volumes of 1.5 s, offset 0.0 s) and the film segment (0.04 s) share no complete TR', naming no file."
    from giblet.dataset import load_spec
    film = tmp_path / "film.mp4"
    if frames: _write_film(film, frames)
    else: film.write_bytes(b"")                                  # an empty file (an interrupted download)
    with pytest.raises(ValueError) as e:
        load_spec(resolve_study(short_study.root, film=film), tmp_path / "cache", show_progress=False)
    assert str(e.value).startswith(str(film)), e.value
    if frames == 1: assert "holds 1 frame" in str(e.value)


def test_giblet_synth_writes_bids(tmp_path, capsys):
    "BIDS could only be written from Python: giblet-synth had no --layout."
    pytest.importorskip("bids")
    out = tmp_path / "bids"
    cli.giblet_synth(["--out", str(out), "--layout", "bids", "--n-subjects", "1", "--n-trs", "40"])
    assert (out / "dataset_description.json").is_file() and (out / "synthetic_summary.png").is_file()
    spec = resolve_study(out)
    assert spec.subjects == ["sub-01"] and next(iter(spec.runs[0].nii.values())).name == "sub-01_task-movie_bold.nii.gz"
    code, err = _exit(cli.giblet_synth, ["--out", str(tmp_path / "x"), "--layout", "flat"], capsys)
    assert code == 2 and "--layout 'flat'" in err, err


# --- a corrupt cache, a cache too large, messages that name the option --------------------------------------------------

def test_a_corrupt_cache_with_its_time_stamp_kept_is_named_not_the_subject(short_study, tmp_path):
    "Bytes changed in place with the time stamp kept: training said 'subject 1 holds NaN or inf values'; only --verify found it."
    import numpy as np
    from giblet.dataset import stream_folders
    from giblet.training.config import TrainConfig
    from giblet.training.data import prepare_data
    cfg = TrainConfig.make(data_dir=str(short_study.root), preset="tiny", cache_dir=str(tmp_path / "cache"), progress=False, device="cpu")
    al = prepare_data(cfg).aligned
    folder = stream_folders(al.cache)["fmri"]
    for f in folder.iterdir(): os.utime(f, (1e9, 1e9))
    gio.load_arrays(folder)                                        # checked once: the time stamps are recorded
    f = folder / "fmri.npy"; stamp = f.stat().st_mtime_ns
    m = np.load(f, mmap_mode="r+"); m[1, 5, 3] = np.nan; m.flush(); del m
    os.utime(f, ns=(stamp, stamp))
    with pytest.raises(ValueError) as e: prepare_data(cfg)
    msg = str(e.value)
    assert "because the cache is corrupt" in msg and str(f) in msg and "giblet-cache --verify" in msg, msg
    assert "subject 2 (of 2)" in msg and "rebuilds" in msg, msg
    assert prepare_data(cfg).aligned.cache == al.cache              # the next run rebuilds the damaged stream


def test_frames_too_large_for_memory_or_disk_are_refused_before_decoding(short_study, tmp_path, monkeypatch):
    "A frame size that needed 24 GiB was decoded into memory before any size check: the machine swapped, or the process was killed."
    import giblet.dataset as ds
    from giblet.alignment.sync import FeatureParams, RunSpec
    from giblet.dataset import load_spec
    from giblet.study_plan import plan_runs
    params = FeatureParams(size=(32, 18))
    plans = plan_runs([(short_study.film, short_study.annotations, RunSpec(nii=list(short_study.nii)))], None, params)
    frames = ds.run_video(plans[0], params)                       # what the build holds, for the exact estimate
    need, lots = frames.nbytes, 10**15
    with monkeypatch.context() as m:
        m.setattr(ds, "run_video", lambda *a: pytest.fail("decoded before the size check"))
        m.setattr(ds, "free_space", lambda root: (need - 1, lots))
        with pytest.raises(ValueError) as e: load_spec(short_study.root, tmp_path / "cache", params=params, show_progress=False)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and f"{need / 1e9:.3g} GB of memory ({(need - 1) / 1e9:.3g} GB free)" in msg and "nothing was decoded" in msg, msg
        assert f"({len(frames)} TRs x {frames.shape[1]} frames of 32x18 px)" in msg, msg
        assert "--preset tiny" in msg and '"frame_width"' in msg, msg
        m.setattr(ds, "free_space", lambda root: (lots, need))        # the disk: refused as every cache write is refused
        with pytest.raises(DiskFullError) as e: load_spec(short_study.root, tmp_path / "cache", params=params, show_progress=False)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and f"no space left in {tmp_path / 'cache'} for frames: it needs " in msg, msg
        m.setattr(ds, "free_space", lambda root: (need, need + 2**16))
        ds._check_frames_room(plans, params, tmp_path)            # exactly enough room: no refusal


def test_a_sweep_over_a_missing_study_names_data_dir(tmp_path):
    "Every run of the sweep failed in turn ('run_000 failed: ...'), and nothing said the grid's data_dir was the fix."
    (tmp_path / "grid.yaml").write_text(f"epochs: [1]\ndata_dir: [{tmp_path / 'nowhere'}]\n")
    with pytest.raises(FileNotFoundError) as e: cli.sweep_main(str(tmp_path / "grid.yaml"), str(tmp_path / "sweep"))
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "--data-dir" in msg and "data_dir" in msg, msg
    assert not (tmp_path / "sweep").exists()


def test_discovery_and_annotation_errors_name_the_option(tmp_path):
    "'no annotation file', '2 film files, expected one' and 'annotation file not found' named no option that fixes them."
    from giblet.data.text import load_annotations
    with pytest.raises(FileNotFoundError, match="does not exist \\(check --data-dir\\)"): discover(tmp_path / "nowhere")
    root = _flat_study(tmp_path / "study"); (root / "ann.csv").unlink(); (root / "film2.mp4").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as e: discover(root)
    msg = str(e.value)
    assert "no annotation file (*.xlsx|*.csv|*.tsv); name it with --annotations" in msg, msg
    assert "2 film files, expected one" in msg and "choose one with --film" in msg, msg
    with pytest.raises(FileNotFoundError) as e: load_annotations(tmp_path / "gone.xlsx")
    assert str(e.value).startswith(str(tmp_path / "gone.xlsx")) and "--annotations" in str(e.value), e.value


def test_giblet_features_cache_expands_like_giblet_cache(tmp_path, monkeypatch):
    "GIBLET_FEATURES_CACHE='~/f' made a folder named '~' in the working folder; GIBLET_CACHE was already expanded."
    from giblet.features import default_streams_dir as features_cache
    monkeypatch.setenv("HOME", str(tmp_path / "home")); monkeypatch.setenv("WHERE", "f"); monkeypatch.chdir(tmp_path)
    for value, want in (("~/f", tmp_path / "home" / "f"), ("$HOME/${WHERE}", tmp_path / "home" / "f"), ("rel", tmp_path / "rel")):
        monkeypatch.setenv("GIBLET_FEATURES_CACHE", value)
        assert features_cache() == want, value
    monkeypatch.setenv("GIBLET_FEATURES_CACHE", "$NO_SUCH_VARIABLE_HERE/f")
    with pytest.raises(ValueError, match="GIBLET_FEATURES_CACHE='\\$NO_SUCH_VARIABLE_HERE/f' names an unset variable"): features_cache()


def test_a_broken_link_in_a_spec_is_named_with_its_target(tmp_path):
    "check_spec said only 'nii.s2: PATH' under 'missing files', though PATH was there: a link to an unfetched file."
    from giblet.study_plan import check_spec
    root = _flat_study(tmp_path / "study", ("s1.nii.gz",))
    target = tmp_path / "annex" / "objects" / "MD5E-s123--abc.nii.gz"
    os.symlink(target, root / "s2.nii.gz")
    (tmp_path / "spec.yaml").write_text(textwrap.dedent(f"""\
        tr: 1.5
        film: {root / 'film.m4v'}
        annotations: {root / 'ann.csv'}
        runs:
          - nii: {{s1: {root / 's1.nii.gz'}, s2: {root / 's2.nii.gz'}}}
        """))
    spec = read_spec(tmp_path / "spec.yaml")
    with pytest.raises(FileNotFoundError) as e: check_spec(spec)
    msg = str(e.value)
    assert f"nii.s2: {root / 's2.nii.gz'}" in msg and "broken link" in msg and f"{root / 's2.nii.gz'} -> {target}" in msg, msg
    assert "nii.s1" not in msg, msg
