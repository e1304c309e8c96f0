"""Corpus readers on tiny corpora written with each corpus's naming convention, plus hedgewars and synth."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from client.corpora import (
    CORPORA,
    EFFORT_PREFIXES,
    EXCLUDED_PHRASES,
    HEDGEWARS_VOICES,
    PHRASE_EMOTIONS,
    cremad_prepare,
    csv_prepare,
    emodb_prepare,
    hedgewars_prepare,
    prepare,
    median_f0,
    ravdess_prepare,
    synth_prepare,
    tess_prepare,
)
from shared_models.audio import SkippedClipsWarning
from shared_models.manifest import MANIFEST_COLUMNS, ManifestError, read_manifest


def write_clip(path: Path, kind: str = "tone", sr: int = 16_000, seconds: float = 0.5, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if kind == "corrupt":
        path.write_bytes(rng.bytes(3000))
        return
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.05 * rng.standard_normal(t.size)
    sf.write(path, (x * (kind != "silent")).astype(np.float32), sr)


# file -> (speaker, gender, emotion); "corrupt"/"silent" files are named validly and must be skipped
CASES = {
    "emodb": {
        "wav/03a01Fa.wav": ("emodb-03", "male", "happiness"),
        "wav/08b02Wb.wav": ("emodb-08", "female", "anger"),
        "wav/16a05Tc.wav": ("emodb-16", "female", "sadness"),
        "wav/10a07Ld.wav": ("emodb-10", "male", "boredom"),
        "wav/11a01Ea.wav": "corrupt",
        "wav/13b09Na.wav": "silent",
    },
    "ravdess": {
        "Actor_01/03-01-05-01-02-01-01.wav": ("ravdess-01", "male", "anger"),
        "Actor_02/03-01-02-02-01-02-02.wav": ("ravdess-02", "female", "calm"),
        "Actor_02/03-01-08-01-01-01-02.wav": ("ravdess-02", "female", "surprise"),
        "Actor_03/03-01-03-01-01-01-03.wav": ("ravdess-03", "male", "happiness"),
        "Actor_03/03-01-06-01-01-01-03.wav": "corrupt",
        "Actor_04/03-01-07-01-01-01-04.wav": "silent",
    },
    "crema-d": {
        "AudioWAV/1001_DFA_ANG_XX.wav": ("crema-d-1001", "male", "anger"),
        "AudioWAV/1002_IEO_SAD_LO.wav": ("crema-d-1002", "female", "sadness"),
        "AudioWAV/1091_IEO_HAP_HI.wav": ("crema-d-1091", "female", "happiness"),
        "AudioWAV/1001_IOM_DIS_XX.wav": ("crema-d-1001", "male", "disgust"),
        "AudioWAV/1002_DFA_FEA_XX.wav": "corrupt",
        "AudioWAV/1091_DFA_NEU_XX.wav": "silent",
    },
    "tess": {
        "OAF_angry/OAF_back_angry.wav": ("tess-oaf", "female", "anger"),
        "YAF_pleasant_surprise/YAF_bar_pleasant_surprised.wav": ("tess-yaf", "female", "surprise"),
        "OAF_Pleasant_surprise/OAF_back_ps.wav": ("tess-oaf", "female", "surprise"),
        "YAF_sad/YAF_germ_sad.wav": ("tess-yaf", "female", "sadness"),
        "OAF_Fear/OAF_bite_fear.wav": "corrupt",
        "YAF_happy/YAF_bite_happy.wav": "silent",
    },
}


def build(root: Path, files: dict) -> None:
    for i, (rel, spec) in enumerate(files.items()):
        kind = spec if isinstance(spec, str) else "tone"
        write_clip(root / rel, kind, sr=44_100 if i % 2 else 16_000, seed=i)
    write_clip(root / "extra" / "README_take2.wav", seed=99)  # does not follow the convention


@pytest.mark.parametrize("corpus", list(CASES))
def test_reader_parses_names_and_skips_bad_clips(tmp_path, corpus):
    files = CASES[corpus]
    build(tmp_path / "src", files)
    if corpus == "crema-d":
        (tmp_path / "src" / "VideoDemographics.csv").write_text(
            "ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,Caucasian,Not Hispanic\n"
            "1002,21,Female,Caucasian,Not Hispanic\n1091,29,Female,Asian,Not Hispanic\n"
        )
    with pytest.warns(SkippedClipsWarning, match=f"skipped 3 of 7 {corpus} clips") as rec:
        result = prepare(corpus, tmp_path / "src", tmp_path / "m.csv")
    assert len(rec) == 1 and all(f"1 {r}" in str(rec[0].message) for r in ("unreadable", "silent", "bad-name"))
    assert result.skipped.as_dict() == {"unreadable": 1, "silent": 1, "bad-name": 1}
    assert result.skipped_csv == tmp_path / "m.skipped.csv" and str(result.skipped_csv) in str(rec[0].message)
    listed = pd.read_csv(result.skipped_csv, keep_default_na=False)
    bad = {Path(rel).name: spec for rel, spec in files.items() if isinstance(spec, str)}
    assert dict(zip(listed["path"].map(lambda p: Path(p).name), listed["reason"])) == {
        "README_take2.wav": "bad-name", **{name: {"corrupt": "unreadable"}.get(kind, kind) for name, kind in bad.items()}}
    assert (listed["detail"] != "").all()
    expected = {Path(rel).name: spec for rel, spec in files.items() if not isinstance(spec, str)}
    df = read_manifest(result.manifest)
    assert list(df.columns[:7]) == list(MANIFEST_COLUMNS)
    got = {Path(p).name: (s, g, e) for p, s, g, e in df[["path", "speaker", "gender", "emotion"]].itertuples(index=False)}
    assert got == expected
    assert result.n_clips == 4 and result.n_speakers == len({v[0] for v in expected.values()})
    assert df["arousal"].isna().all() and (df["duration"] > 0.49).all()


def test_cremad_without_demographics_has_empty_gender(tmp_path):
    build(tmp_path / "src", CASES["crema-d"])
    with pytest.warns(SkippedClipsWarning):
        df = read_manifest(prepare("crema-d", tmp_path / "src", tmp_path / "m.csv").manifest)
    assert set(df["gender"]) == {""} and len(df) == 4


def test_ravdess_song_only_on_request_and_paths_absolute(tmp_path, monkeypatch):
    write_clip(tmp_path / "Actor_05" / "03-01-04-01-01-01-05.wav")
    write_clip(tmp_path / "Actor_05" / "03-02-04-01-01-01-05.wav")
    monkeypatch.chdir(tmp_path)
    speech = ravdess_prepare(".", "out/speech.csv")
    both = ravdess_prepare(".", "out/both.csv", include_song=True)
    assert (speech.n_clips, both.n_clips, speech.skipped.total) == (1, 2, 0)
    written = pd.read_csv(speech.manifest)["path"].tolist()
    assert written == [str(tmp_path / "Actor_05" / "03-01-04-01-01-01-05.wav")]
    write_clip(tmp_path / "Actor_05" / "03-01-04-02-01-01-05.wav")  # intensity 02: strong
    df = pd.read_csv(ravdess_prepare(".", "out/intensity.csv").manifest)
    assert dict(zip(df["path"].map(lambda p: Path(p).name), df["intensity"])) == {
        "03-01-04-01-01-01-05.wav": "normal", "03-01-04-02-01-01-05.wav": "strong"}


def labels(result) -> dict:
    """``{file name: (speaker, gender, emotion)}`` of a reader's manifest; fails on a name listed twice."""
    df = read_manifest(result.manifest)
    names = [Path(p).name for p in df["path"]]
    assert len(names) == len(set(names)) == result.n_clips, "a clip is listed twice"
    return dict(zip(names, zip(df["speaker"], df["gender"], df["emotion"])))


@pytest.mark.filterwarnings("error::shared_models.audio.SkippedClipsWarning")
def test_emodb_archive_layout_every_speaker_and_letter(tmp_path):
    # download.zip: wav/ next to label folders and notes, none of them audio
    genders = dict(zip(["03", "10", "11", "12", "15", "08", "09", "13", "14", "16"], ["male"] * 5 + ["female"] * 5))
    emotions = dict(W="anger", L="boredom", E="disgust", A="fear", F="happiness", T="sadness", N="neutral")
    texts = ["a01", "a02", "a04", "a05", "a07", "b01", "b02", "b03", "b09", "b10"]  # EmoDB's ten texts
    expected = {}
    for i, speaker in enumerate(genders):
        letter = "WLEAFTN"[i % 7]
        name = f"{speaker}{texts[i]}{letter}{'abc'[i % 3]}.wav"  # versions a, b, c
        write_clip(tmp_path / "wav" / name, seconds=0.35, seed=i)
        expected[name] = (f"emodb-{speaker}", genders[speaker], emotions[letter])
    for folder, ext in [("lablaut", ".lab"), ("labsilb", ".lab"), ("silb", ".silb")]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"03a01Fa{ext}").write_text("0.1 a\n")
    (tmp_path / "erklaerung.txt").write_text("Datenbank")
    write_clip(tmp_path / "__MACOSX" / "wav" / "._03a01Fa.wav", "corrupt")  # macOS zip metadata
    result = emodb_prepare(tmp_path, tmp_path / "m.csv")
    assert labels(result) == expected and result.n_speakers == 10 and result.skipped.total == 0


def test_duplicate_clip_keeps_the_first_usable_copy(tmp_path):
    write_clip(tmp_path / "copy1" / "wav" / "03a01Fa.wav", "corrupt")
    write_clip(tmp_path / "copy2" / "wav" / "03a01Fa.wav")
    write_clip(tmp_path / "copy3" / "wav" / "03a01Fa.wav")
    with pytest.warns(SkippedClipsWarning, match="skipped 2 of 3 emodb clips"):
        result = emodb_prepare(tmp_path, tmp_path / "m.csv")
    assert result.skipped.as_dict() == {"unreadable": 1, "duplicate": 1}
    assert read_manifest(result.manifest)["path"].tolist() == [str(tmp_path / "copy2" / "wav" / "03a01Fa.wav")]


def test_ravdess_nested_and_duplicated_folders_video_and_emotion_names(tmp_path):
    names = {  # every emotion code once; odd actors male, even female
        "03-01-01-01-01-01-01.wav": ("ravdess-01", "male", "neutral"),
        "03-01-02-02-01-02-02.wav": ("ravdess-02", "female", "calm"),
        "03-01-03-01-02-01-03.wav": ("ravdess-03", "male", "happiness"),
        "03-01-04-02-02-02-04.wav": ("ravdess-04", "female", "sadness"),
        "03-01-05-01-01-01-13.wav": ("ravdess-13", "male", "anger"),
        "03-01-06-02-01-02-12.wav": ("ravdess-12", "female", "fear"),
        "03-01-07-01-02-01-23.wav": ("ravdess-23", "male", "disgust"),
        "03-01-08-02-02-02-24.wav": ("ravdess-24", "female", "surprise"),
    }
    twice = tmp_path / "Audio_Speech_Actors_01-24" / "Audio_Speech_Actors_01-24"  # unzipped into its own name
    for i, name in enumerate(names):
        actor = f"Actor_{name[-6:-4]}"
        write_clip(twice / actor / name, seconds=0.35, seed=i)
        if i % 2:  # the Kaggle copy holds Actor_XX/ and audio_speech_actors_01-24/Actor_XX/ with the same clips
            copy = tmp_path / "audio_speech_actors_01-24" / actor / name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(twice / actor / name, copy)
    (tmp_path / "Video_Speech_Actor_01" / "Actor_01").mkdir(parents=True)
    (tmp_path / "Video_Speech_Actor_01" / "Actor_01" / "01-01-01-01-01-01-01.mp4").write_bytes(b"\0" * 500)
    write_clip(tmp_path / "extracted" / "01-01-05-01-01-01-01.wav")  # audio taken from a full-AV video: same take
    write_clip(tmp_path / "extracted" / "02-01-05-01-01-01-01.wav")  # video-only
    write_clip(twice / "Actor_01" / "03-02-05-01-01-01-01.wav")  # song: left out by default
    with pytest.warns(SkippedClipsWarning, match="skipped 6 of 14 ravdess clips"):
        result = ravdess_prepare(tmp_path, tmp_path / "m.csv")
    assert labels(result) == names
    assert result.skipped.as_dict() == {"duplicate": 4, "video-modality": 2}


def test_cremad_repo_layout_mp3_copies_empty_clip_and_demographics_in_parent(tmp_path):
    root = tmp_path / "CREMA-D"
    expected = {
        "1001_DFA_ANG_XX.wav": ("crema-d-1001", "male", "anger"),
        "1002_IEO_HAP_HI.wav": ("crema-d-1002", "female", "happiness"),
        "1076_MTI_NEU_XX.wav": ("crema-d-1076", "female", "neutral"),
        "1091_IEO_FEA_MD.wav": ("crema-d-1091", "female", "fear"),
        "1005_ITS_DIS_XX.wav": ("crema-d-1005", "male", "disgust"),
    }
    for i, name in enumerate(expected):
        write_clip(root / "AudioWAV" / name, seconds=0.35, seed=i)
        write_clip(root / "AudioMP3" / name.replace(".wav", ".mp3"), seconds=0.35, seed=i)  # the same clips again
    sf.write(root / "AudioWAV" / "1076_MTI_SAD_XX.wav", np.zeros(0, np.float32), 16_000, subtype="PCM_16")
    assert (root / "AudioWAV" / "1076_MTI_SAD_XX.wav").stat().st_size == 44  # as in the real repo
    (root / "VideoFlash").mkdir()
    (root / "VideoFlash" / "1001_DFA_ANG_XX.flv").write_bytes(b"FLV")
    (root / "VideoDemographics.csv").write_text(
        "ActorID,Age,Sex,Race,Ethnicity\r\n1001,51,Male,Caucasian,Not Hispanic\r\n1002,21,Female,Caucasian,"
        "Not Hispanic\r\n1005,36,Male,African American,Not Hispanic\r\n1076,25,Female,Asian,Not Hispanic\r\n"
        "1091,29,Female,Asian,Not Hispanic\r\n", encoding="utf-8-sig")  # with a byte-order mark
    # the repo (each clip also as MP3: the WAV kept), or its AudioWAV folder (demographics one level up)
    for source, warning in ((root, r"skipped 6 of 11 crema-d clips \(5 duplicate, 1 empty\)"),
                            (root / "AudioWAV", r"skipped 1 of 6 crema-d clips \(1 empty\), e.g. .*1076_MTI_SAD_XX")):
        with pytest.warns(SkippedClipsWarning, match=warning):
            result = cremad_prepare(source, tmp_path / "m.csv")
        assert labels(result) == expected
        levels = read_manifest(result.manifest).set_index("path")["level"]
        assert {Path(k).name: v for k, v in levels.items()}["1002_IEO_HAP_HI.wav"] == "high"
        assert sorted(levels) == ["high", "medium", "unspecified", "unspecified", "unspecified"]


def test_tess_kaggle_copy_folder_and_file_name_quirks(tmp_path):
    files = {  # folder/file as found in the copies -> one clip each
        "OAF_angry/OAF_back_angry.wav": ("tess-oaf", "female", "anger"),
        "OAF_Fear/OAF_back_fear.wav": ("tess-oaf", "female", "fear"),
        "YAF_fear/YAF_back_fear.wav": ("tess-yaf", "female", "fear"),
        "OAF_Pleasant_surprise/OAF_back_ps.wav": ("tess-oaf", "female", "surprise"),
        "YAF_pleasant_surprised/YAF_back_ps.wav": ("tess-yaf", "female", "surprise"),
        "OAF_neutral/OAF_back_neutral.wav": ("tess-oaf", "female", "neutral"),
        "YAF_neutral/YAF_back_Neutral.WAV": ("tess-yaf", "female", "neutral"),
        "OAF_Sad/OAF_bath_sad.wav.wav": ("tess-oaf", "female", "sadness"),
        "YAF_disgust/YAF_bath_disgust_disgust.wav": ("tess-yaf", "female", "disgust"),
        "YAF_happy/YA_bath_happy.wav": ("tess-yaf", "female", "happiness"),
    }
    outer = tmp_path / "TESS Toronto emotional speech set data"
    for i, rel in enumerate(files):
        write_clip(outer / "TESS Toronto emotional speech set data" / rel, seconds=0.35, seed=i)
        write_clip(outer / rel.replace("OAF_", "oaf_").replace("YAF_", "yaf_"), seconds=0.35, seed=i)  # second copy
    with pytest.warns(SkippedClipsWarning, match="skipped 10 of 20 tess clips \\(10 duplicate\\)"):
        result = tess_prepare(tmp_path, tmp_path / "m.csv")
    df = read_manifest(result.manifest)
    got = sorted(zip(df["speaker"], df["gender"], df["emotion"]))
    assert got == sorted(files.values()) and result.n_speakers == 2
    assert all("TESS Toronto emotional speech set data/TESS" in p for p in df["path"])  # the first copy, sorted
    assert dict(zip(df["speaker"], df["age_group"])) == {"tess-oaf": "older", "tess-yaf": "younger"}


def test_csv_corpus_keeps_extra_columns_and_names_bad_rows(tmp_path):
    write_clip(tmp_path / "clips" / "a.wav")
    write_clip(tmp_path / "clips" / "b.wav", "silent")
    src = tmp_path / "mine.csv"
    src.write_text(",".join(MANIFEST_COLUMNS) + ",age\nclips/a.wav,p1,female,anger,0.5,-0.5,,30\n"
                   "clips/b.wav,p2,male,,,,,40\n")
    with pytest.warns(SkippedClipsWarning, match="1 silent"):
        result = csv_prepare(src, tmp_path / "out" / "m.csv")
    df = read_manifest(result.manifest)
    assert df["path"].tolist() == [str(tmp_path / "clips" / "a.wav")]
    assert df.loc[0, "age"] == "30" and df.loc[0, "duration"] == pytest.approx(0.5)
    src.write_text(",".join(MANIFEST_COLUMNS) + "\nclips/a.wav,p1,female,anger,,,\nclips/a.wav,p1,,angryy,,,\n")
    with pytest.raises(ManifestError, match="line 3, column emotion"):
        csv_prepare(src, tmp_path / "m2.csv")


def test_unknown_corpus_and_missing_source(tmp_path):
    with pytest.raises(ValueError, match="known corpora: emodb, ravdess, crema-d, tess, csv, hedgewars, synth"):
        prepare("iemocapp", tmp_path, tmp_path / "m.csv")
    assert set(CORPORA) == {"emodb", "ravdess", "crema-d", "tess", "csv", "hedgewars", "synth"}
    with pytest.raises(FileNotFoundError, match="source folder not found"):
        prepare("emodb", tmp_path / "nope", tmp_path / "m.csv")


@pytest.mark.skipif(not HEDGEWARS_VOICES.is_dir(), reason="hedgewars-data is not installed")
def test_hedgewars(tmp_path):
    with pytest.warns(SkippedClipsWarning):  # a few short or unmapped clips
        result = hedgewars_prepare(None, tmp_path / "hw.csv")
    df = read_manifest(result.manifest)
    assert result.n_speakers == 13 and df["speaker"].nunique() == 13
    assert not df["speaker"].isin(["hw-Robot", "hw-Singer"]).any()
    assert not df["phrase"].str.startswith(EFFORT_PREFIXES).any()
    assert not df["phrase"].isin(EXCLUDED_PHRASES).any() and df["phrase"].isin(list(PHRASE_EMOTIONS)).all()
    assert (df["emotion"] != "").all() and df["arousal"].notna().all() and df["valence"].notna().all()
    assert set(df["gender"]) == {"female", "male"}
    assert len(df) > 400


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@needs_espeak
def test_synth_corpus(tmp_path):
    kw = dict(n_speakers=2, clips_per_emotion=2, seed=3)
    first = synth_prepare(tmp_path / "a", tmp_path / "a.csv", **kw)
    df = read_manifest(first.manifest)
    assert first.n_clips == len(df) == 2 * 6 * 2 and first.n_speakers == 2
    assert df.groupby("speaker")["gender"].first().to_dict() == {"synth-m1": "male", "synth-f1": "female"}
    assert (df["emotion"] != "").all() and df["arousal"].between(-1, 1).all() and df["valence"].notna().all()
    assert df.groupby("emotion")["arousal"].mean().idxmax() in ("anger", "fear")
    info = sf.info(df.loc[0, "path"])
    assert (info.samplerate, info.channels) == (16_000, 1)

    # deterministic for a seed: same labels and the same audio in another folder
    second = read_manifest(synth_prepare(tmp_path / "b", tmp_path / "b.csv", **kw).manifest)
    labels = ["speaker", "gender", "emotion", "arousal", "valence"]
    pd.testing.assert_frame_equal(df[labels], second[labels])
    assert np.array_equal(sf.read(df.loc[5, "path"])[0], sf.read(second.loc[5, "path"])[0])

    # reused on a second call with the same settings, regenerated with other settings
    stamp = Path(df.loc[0, "path"]).stat().st_mtime_ns
    again = synth_prepare(tmp_path / "a", tmp_path / "a2.csv", **kw)
    assert again.n_clips == first.n_clips and Path(df.loc[0, "path"]).stat().st_mtime_ns == stamp
    other = read_manifest(synth_prepare(tmp_path / "a", tmp_path / "a3.csv", **{**kw, "seed": 4}).manifest)
    assert not np.allclose(other["arousal"], df["arousal"])


@needs_espeak
def test_synth_many_speakers_are_distinct_voices_of_the_declared_gender(tmp_path):
    # the fairness benchmark needs many speakers per gender; a variant whose declared gender
    # does not match its voice would put a low voice in the female group
    result = synth_prepare(tmp_path / "s", tmp_path / "s.csv", n_speakers=32, clips_per_emotion=1, emotions=("neutral",))
    df = read_manifest(result.manifest)
    genders = df.groupby("speaker")["gender"].first()
    assert result.n_speakers == 32 and genders.value_counts().to_dict() == {"female": 16, "male": 16}
    f0 = {spk: median_f0(g["path"]) for spk, g in df.groupby("speaker")}
    female = [f0[s] for s in genders.index[genders == "female"]]
    male = [f0[s] for s in genders.index[genders == "male"]]
    assert min(female) > max(male), (sorted(female), sorted(male))
    with pytest.raises(ValueError, match=r"n_speakers must be in 1..36"):
        synth_prepare(tmp_path / "t", tmp_path / "t.csv", n_speakers=37)


def test_synth_without_espeak_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        synth_prepare(tmp_path / "s", tmp_path / "s.csv", n_speakers=1, clips_per_emotion=1)


def test_cremad_mp3_only_copy_is_read(tmp_path):
    root = tmp_path / "CREMA-D"
    for i, name in enumerate(["1001_DFA_ANG_XX.mp3", "1002_IEO_HAP_HI.mp3", "1005_ITS_DIS_XX.mp3"]):
        write_clip(root / "AudioMP3" / name, seconds=0.6, seed=i)
    (root / "VideoDemographics.csv").write_text("ActorID,Age,Sex\n1001,51,Male\n1002,21,Female\n1005,36,Male\n")
    result = cremad_prepare(root, tmp_path / "m.csv")
    assert labels(result) == {"1001_DFA_ANG_XX.mp3": ("crema-d-1001", "male", "anger"),
                              "1002_IEO_HAP_HI.mp3": ("crema-d-1002", "female", "happiness"),
                              "1005_ITS_DIS_XX.mp3": ("crema-d-1005", "male", "disgust")}
    assert (read_manifest(result.manifest)["duration"] > 0.5).all()  # decoded, not just listed


def skipped_list(result) -> dict:
    """``{file name: (reason, detail)}`` of a reader's ``.skipped.csv``."""
    listed = pd.read_csv(result.skipped_csv, keep_default_na=False)
    assert list(listed.columns) == ["path", "reason", "detail"]
    return {Path(p).name: (r, d) for p, r, d in listed.itertuples(index=False)}


def test_emodb_speakers_and_texts_it_does_not_have_are_not_emodb_names(tmp_path):
    write_clip(tmp_path / "wav" / "03a01Fa.wav")
    write_clip(tmp_path / "wav" / "99a01Fa.wav")  # no speaker 99
    write_clip(tmp_path / "wav" / "04a01Fa.wav")  # nor 04
    write_clip(tmp_path / "wav" / "03a03Wa.wav")  # no text a03
    with pytest.warns(SkippedClipsWarning, match="skipped 3 of 4 emodb clips \\(3 bad-name\\)"):
        result = emodb_prepare(tmp_path, tmp_path / "emodb.csv")
    assert labels(result) == {"03a01Fa.wav": ("emodb-03", "male", "happiness")}
    listed = skipped_list(result)
    assert result.skipped_csv == tmp_path / "emodb.skipped.csv"
    assert set(listed) == {"99a01Fa.wav", "04a01Fa.wav", "03a03Wa.wav"}
    assert "speaker 99" in listed["99a01Fa.wav"][1] and "text a03" in listed["03a03Wa.wav"][1]


def test_ravdess_names_ravdess_does_not_have_are_bad_names(tmp_path):
    write_clip(tmp_path / "Actor_01" / "03-01-01-01-01-01-01.wav")  # normal neutral: fine
    write_clip(tmp_path / "Actor_01" / "03-01-01-02-01-01-01.wav", seed=1)  # strong neutral: none in RAVDESS
    write_clip(tmp_path / "Actor_25" / "03-01-05-01-01-01-25.wav", seed=2)  # 24 actors
    write_clip(tmp_path / "Actor_00" / "03-01-05-01-01-01-00.wav", seed=3)
    write_clip(tmp_path / "Actor_02" / "03-02-07-01-01-01-02.wav", seed=4)  # sung disgust: none
    write_clip(tmp_path / "Actor_02" / "03-02-08-02-01-01-02.wav", seed=5)  # sung surprise: none
    write_clip(tmp_path / "Actor_02" / "03-02-03-02-01-01-02.wav", seed=6)  # sung strong happiness: fine
    with pytest.warns(SkippedClipsWarning, match="skipped 5 of 7 ravdess clips \\(5 bad-name\\)"):
        result = ravdess_prepare(tmp_path, tmp_path / "m.csv", include_song=True)
    assert labels(result) == {"03-01-01-01-01-01-01.wav": ("ravdess-01", "male", "neutral"),
                              "03-02-03-02-01-01-02.wav": ("ravdess-02", "female", "happiness")}
    listed = skipped_list(result)
    assert "no strong (02) neutral" in listed["03-01-01-02-01-01-01.wav"][1]
    assert "actor 25" in listed["03-01-05-01-01-01-25.wav"][1] and "disgust" in listed["03-02-07-01-01-01-02.wav"][1]


def test_cremad_names_it_does_not_have_are_bad_names_and_its_x_level_quirk_is_read(tmp_path):
    good = {"1040_ITH_SAD_X.wav": ("crema-d-1040", "", "sadness"),  # as distributed: one X
            "1001_IEO_HAP_LO.wav": ("crema-d-1001", "", "happiness")}
    bad = ["1092_DFA_ANG_XX.wav", "1000_DFA_ANG_XX.wav",  # actors 1001-1091
           "1001_ABC_ANG_XX.wav",  # not one of the 12 sentences
           "1001_TIE_ANG_HI.wav",  # levels only on IEO
           "1001_IEO_ANG_ZZ.wav"]  # no level ZZ
    for i, name in enumerate([*good, *bad]):
        write_clip(tmp_path / "AudioWAV" / name, seed=i)
    with pytest.warns(SkippedClipsWarning, match="skipped 5 of 7 crema-d clips \\(5 bad-name\\)"):
        result = cremad_prepare(tmp_path, tmp_path / "m.csv")
    assert labels(result) == good
    levels = read_manifest(result.manifest)["level"].tolist()
    assert sorted(levels) == ["low", "unspecified"]
    listed = skipped_list(result)
    assert set(listed) == set(bad) and "only IEO" in listed["1001_TIE_ANG_HI.wav"][1]


def test_hand_made_csv_with_only_some_columns_and_missing_files(tmp_path):
    write_clip(tmp_path / "clips" / "a.wav", seconds=0.6)
    write_clip(tmp_path / "clips" / "b.wav", seconds=0.4, seed=1)
    write_clip(tmp_path / "clips" / "c.wav", "corrupt")
    src = tmp_path / "my.csv"
    src.write_text("path,speaker,gender,emotion\nclips/a.wav,p1,female,anger\nclips/b.wav,p1,female,\n"
                   "clips/gone.wav,p2,male,sadness\nclips/c.wav,p2,male,fear\n")
    with pytest.warns(SkippedClipsWarning, match="skipped 2 of 4 csv clips \\(1 missing, 1 unreadable\\)"):
        result = csv_prepare(src, tmp_path / "out.csv")
    df = read_manifest(result.manifest)
    assert df["path"].tolist() == [str(tmp_path / "clips" / "a.wav"), str(tmp_path / "clips" / "b.wav")]
    assert df["emotion"].tolist() == ["anger", ""] and df["arousal"].isna().all() and df["valence"].isna().all()
    assert df["duration"].tolist() == pytest.approx([0.6, 0.4])  # probed
    assert skipped_list(result) == {"gone.wav": ("missing", "no such file"),
                                    "c.wav": ("unreadable", skipped_list(result)["c.wav"][1])}
    src.write_text("path,speaker\nclips/a.wav,p1\n")  # path and speaker are enough
    result = csv_prepare(src, tmp_path / "out.csv")
    assert result.n_clips == 1 and result.skipped_csv is None
    assert not (tmp_path / "out.skipped.csv").exists()  # the earlier list described another scan
    src.write_text("path,emotion\nclips/a.wav,anger\n")  # no speaker: partitions are per speaker
    with pytest.raises(ManifestError, match="missing column.*speaker"):
        csv_prepare(src, tmp_path / "out.csv")


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_an_output_that_cannot_be_written_fails_before_any_clip_is_read(tmp_path, monkeypatch, where):
    import client.corpora as corpora

    if where == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    out = tmp_path / "a-file" / "m.csv" if where == "under-a-file" else Path("/proc/fedaffect-test/m.csv")
    (tmp_path / "a-file").write_text("not a folder")
    write_clip(tmp_path / "src" / "wav" / "03a01Fa.wav")
    read = []
    monkeypatch.setattr(corpora, "probe_duration", lambda p: read.append(p))
    monkeypatch.setattr(corpora, "load_audio", lambda p, **k: read.append(p))
    monkeypatch.setattr(corpora, "_audio_files", lambda *a, **k: read.append(a) or [])
    with pytest.raises(OSError, match=f"cannot write the output manifest {out}"):
        prepare("emodb", tmp_path / "src", out)
    src = tmp_path / "my.csv"
    src.write_text("path,speaker\nsrc/wav/03a01Fa.wav,p1\n")
    with pytest.raises(OSError, match="cannot write the output manifest"):
        csv_prepare(src, out)
    assert read == []
    with pytest.raises(IsADirectoryError, match="is a folder"):
        csv_prepare(src, tmp_path)


def test_cli_prepare_lists_skipped_clips_in_a_file_and_prints_one_clean_line(tmp_path):
    import warnings

    from typer.testing import CliRunner

    from fedaffect.cli import app as cli

    build(tmp_path / "src", CASES["emodb"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = CliRunner().invoke(cli, ["data", "prepare", "emodb", "--source", str(tmp_path / "src"),
                                       "--out", str(tmp_path / "emodb.csv")])
    assert res.exit_code == 0, res.output
    assert not [w for w in caught if issubclass(w.category, SkippedClipsWarning)]
    listed = tmp_path / "emodb.skipped.csv"
    line = next(ln for ln in res.output.splitlines() if ln.startswith("skipped"))
    assert line == f"skipped 3 of 7 clips (1 bad-name, 1 unreadable, 1 silent); each listed with its reason in {listed}"
    assert "Warning" not in res.output and "corpora.py" not in res.output
    assert len(pd.read_csv(listed)) == 3 and len(read_manifest(tmp_path / "emodb.csv")) == 4

    res = CliRunner().invoke(cli, ["data", "prepare", "emodb", "--source", str(tmp_path / "src"),
                                   "--out", str(tmp_path / "emodb.csv" / "m.csv")])
    assert res.exit_code == 2 and "cannot write the output manifest" in res.output

    bad = tmp_path / "bad.csv"
    bad.write_text("path,speaker,emotion\n" + "".join(f"x{i}.wav,p,angryy\n" for i in range(12)))
    res = CliRunner().invoke(cli, ["data", "prepare", "csv", "--source", str(bad), "--out", str(tmp_path / "o.csv")])
    assert res.exit_code == 2 and "line 11, column emotion" in res.output and "and 2 more" in res.output
