"""Manifest schema: round trip, path resolution, and errors that name the line and column."""

import numpy as np
import pandas as pd
import pytest

from shared_models.manifest import (
    MANIFEST_COLUMNS,
    ManifestError,
    label_mask,
    read_manifest,
    validate_manifest,
    write_manifest,
)

HEADER = ",".join(MANIFEST_COLUMNS)


def frame():
    return pd.DataFrame({
        "path": ["/data/a.wav", "/data/b.wav", "/data/c.wav"],
        "speaker": ["s1", "s1", "s2"],
        "gender": ["female", "", "male"],
        "emotion": ["anger", "", ""],
        "arousal": [0.5, np.nan, -1.0],
        "valence": [-0.25, np.nan, 0.0],
        "duration": [1.5, 2.0, np.nan],
        "age": ["31", "", "60"],
    })


def test_round_trip(tmp_path):
    out = write_manifest(frame(), tmp_path / "sub" / "m.csv")
    assert out.read_text().splitlines()[0] == HEADER + ",age"
    back = read_manifest(out)
    pd.testing.assert_frame_equal(back, validate_manifest(frame()))
    assert back["arousal"].dtype == np.float64 and back.loc[1, "emotion"] == ""
    assert label_mask(back)["emotion"].tolist() == [True, False, False]
    assert label_mask(back)["av"].tolist() == [True, False, True]


def test_relative_paths_resolved_against_manifest_folder(tmp_path):
    (tmp_path / "corpus").mkdir()
    path = tmp_path / "corpus" / "m.csv"
    path.write_text(f"{HEADER}\nclips/a.wav,s1,,,,,\n/abs/b.wav,s1,,,,,\n")
    df = read_manifest(path)
    assert df["path"].tolist() == [str(tmp_path / "corpus" / "clips" / "a.wav"), "/abs/b.wav"]


@pytest.mark.parametrize(
    "row3,column",
    [
        ("b.wav,s1,,angryy,,,", "emotion"),
        ("b.wav,s1,,,1.5,0,", "arousal"),
        ("b.wav,s1,,,0,high,", "valence"),
        ("b.wav,s1,other,,,,", "gender"),
        ("b.wav,,,,,,", "speaker"),
        ("b.wav,s1,,,,,-2", "duration"),
    ],
)
def test_errors_name_line_and_column(tmp_path, row3, column):
    path = tmp_path / "m.csv"
    path.write_text(f"{HEADER}\na.wav,s1,male,anger,0.1,0.2,1.0\n{row3}\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    msg = str(info.value)
    assert "line 3" in msg and f"column {column}" in msg and str(path) in msg


def test_missing_required_column_named(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,gender,emotion,arousal,duration\na.wav,,,,\n")
    with pytest.raises(ManifestError, match="missing column.*speaker"):
        read_manifest(path)


@pytest.mark.parametrize("header,row", [("path,speaker,gender,emotion", "a.wav,s1,female,anger"),
                                        ("path,speaker,age", "a.wav,s1,31"),
                                        ("speaker,emotion,path,arousal", "s1,anger,a.wav,0.5")])
def test_optional_columns_may_be_missing_and_read_as_empty(tmp_path, header, row):
    path = tmp_path / "m.csv"
    second = ",".join({"path": "b.wav", "speaker": "s2"}.get(c, "") for c in header.split(","))
    path.write_text(f"{header}\n{row}\n{second}\n")
    df = read_manifest(path)
    assert list(df.columns[:7]) == list(MANIFEST_COLUMNS) and len(df) == 2
    given = dict(zip(header.split(","), row.split(",")))
    assert df.loc[0, "path"] == str(tmp_path / "a.wav") and df.loc[0, "speaker"] == "s1"
    assert df.loc[0, "emotion"] == given.get("emotion", "") and df.loc[0, "gender"] == given.get("gender", "")
    assert df.loc[0, "arousal"] == float(given["arousal"]) if "arousal" in given else np.isnan(df.loc[0, "arousal"])
    assert df["valence"].isna().all() and df["duration"].isna().all() and df["duration"].dtype == np.float64
    assert (df["speaker"].iloc[1], df["emotion"].iloc[1], df["gender"].iloc[1]) == ("s2", "", "")


@pytest.mark.parametrize("column,expected", [("Emotion", "emotion"), ("emotions", "emotion"), ("valance", "valence")])
def test_a_misspelt_column_is_refused_not_taken_as_extra(tmp_path, column, expected):
    path = tmp_path / "m.csv"
    path.write_text(f"path,speaker,{column}\na.wav,s1,0.5\n")
    with pytest.raises(ManifestError, match=f"'{column}' \\(did you mean '{expected}'\\?\\)"):
        read_manifest(path)


def test_every_bad_value_is_listed_up_to_ten(tmp_path):
    path = tmp_path / "m.csv"
    rows = ["a.wav,s1,male,anger,0.1,0.2,1.0", "b.wav,s1,,angryy,2,,"]  # line 3: emotion and arousal
    rows += [f"c{i}.wav,,,,,,-1" for i in range(5)]  # lines 4-8: speaker and duration, 10 problems in all
    path.write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    lines = str(info.value).splitlines()
    assert "12 bad value(s)" in lines[0] and str(path) in lines[0]
    assert [ln.strip().split(":")[0] for ln in lines[1:11]] == [
        "line 3, column emotion", "line 3, column arousal",
        *[f"line {n}, column {c}" for n in range(4, 8) for c in ("speaker", "duration")]]
    assert lines[11].strip() == "and 2 more" and len(lines) == 12
    path.write_text(HEADER + "\n" + "\n".join(rows[:2]) + "\n")  # two problems: both, and no "more"
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert len(str(info.value).splitlines()) == 3 and "more" not in str(info.value)


def test_out_of_range_arousal_refused_on_write(tmp_path):
    df = frame()
    df.loc[2, "arousal"] = 1.2
    with pytest.raises(ManifestError, match="line 4, column arousal"):
        write_manifest(df, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")


def test_pandas_missing_values_are_empty_not_the_text_na():
    from shared_models.manifest import validate_manifest

    df = pd.DataFrame({"path": ["a.wav", "b.wav"], "speaker": ["s1", "s2"], "gender": ["female", None],
                       "emotion": ["anger", None], "arousal": [0.1, None], "valence": [0.2, None],
                       "duration": [1.0, 2.0]}).convert_dtypes()  # pd.NA, as read_csv(dtype="string") gives
    out = validate_manifest(df)
    assert out["gender"].tolist() == ["female", ""] and out["emotion"].tolist() == ["anger", ""]
